"""``init_from`` from any checkpoint: a run's workdir, an import directory, a Hugging Face one.

A tiny T5 v1.1 (odd sizes, an embedding with more rows than the tokenizer
has ids, a relative distance other than the presets') is written in each
layout; every layout must resolve to that config and those parameters bit for
bit, a run started from it must begin with exactly them, and every way a run
config can contradict the checkpoint must be one error naming the field and
both values.
"""

import json
import shutil

import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding

from experiments.configs import finetune
from flaxtune.data import SentencePieceTokenizer, load_tokenizer
from flaxtune.data.user_data import register_user_task
from flaxtune.interop import InteropError, export_hf, import_hf, save_flaxtune
from flaxtune.peft import AdapterConfig, LoraConfig, PeftConfig
from flaxtune.train.loop import _setup, train_and_evaluate
from flaxtune.train.mesh import make_mesh
from flaxtune.train.pretrained import (
    PretrainedError,
    load_pretrained,
    resolve_pretrained,
    start_values,
)
from flaxtune.train.run_config import model_config, pretrained_tokenizer
from flaxtune.train.run_config_checks import RunConfigError
from flaxtune.train.run_dir import restore_params, save_params
from flaxtune.transformer import get_config
from tests.interop.util import random_params

WORDS = ("the", "cat", "dog", "sat", "ran", "on", "under", "a", "mat", "red", "blue", "small")
VOCAB = 290  # the tokenizer's ids
EXTRA_ROWS = 7  # embedding rows beyond the tokenizer's ids, as Flan-T5 has 28
TASK = "test_pretrained/pairs"


def sentences(n, seed=0):
    rng = np.random.RandomState(seed)
    return [" ".join(rng.choice(WORDS, rng.randint(3, 9))) for _ in range(n)]


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    """A small T5-layout SentencePiece model saved as ``spiece.model``."""
    tokenizer = SentencePieceTokenizer.train(sentences(400), vocab_size=VOCAB, num_extra_ids=5)
    path = tmp_path_factory.mktemp("tok") / "spiece.model"
    tokenizer.save(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(spiece):
    return load_tokenizer(spiece)


@pytest.fixture(scope="module")
def checkpoint(tokenizer):
    """A tiny T5 v1.1 config (vocab = ids + EXTRA_ROWS) and random parameters."""
    config = get_config(
        "tiny-t5",
        vocab_size=tokenizer.vocab_size + EXTRA_ROWS,
        activation="gated-gelu",
        tie_embeddings=False,
        relative_max_distance=17,
        max_length=512,
    )
    return config, random_params(config, seed=3)


def flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


def write_run_dir(directory, config, params, tokenizer, spiece):
    """A finished run's files: params/, model.json and its tokenizer copies."""
    directory.mkdir(parents=True)
    save_params(directory, params, config, tokenizer)
    tokenizer.save(directory / "tokenizer")
    return directory


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, checkpoint, tokenizer, spiece):
    """The checkpoint in every non-torch layout: kind -> directory."""
    config, params = checkpoint
    root = tmp_path_factory.mktemp("layouts")
    return {
        "run": write_run_dir(root / "run", config, params, tokenizer, spiece),
        "import": save_flaxtune(root / "import", config, params, tokenizer_path=spiece),
        "hf": export_hf(params, config, root / "hf", tokenizer_path=spiece),
        "hf_sharded": export_hf(
            params, config, root / "hf_sharded", tokenizer_path=spiece, max_shard_bytes=20_000
        ),
    }


def assert_flat_equal(actual, expected):
    assert sorted(actual) == sorted(expected)
    for path, value in expected.items():
        got = np.asarray(actual[path])
        assert got.dtype == np.asarray(value).dtype, path
        np.testing.assert_array_equal(got, np.asarray(value), err_msg=path)


@pytest.mark.parametrize("layout", ["run", "import", "hf", "hf_sharded"])
def test_every_layout_resolves_to_the_checkpoint(layouts, layout, checkpoint, tokenizer):
    config, params = checkpoint
    if layout == "hf_sharded":
        assert (layouts[layout] / "model.safetensors.index.json").exists()
        assert len(list(layouts[layout].glob("model-*.safetensors"))) > 1
    source = resolve_pretrained(layouts[layout])
    assert source.kind == layout.removesuffix("_sharded")
    assert source.config == config
    assert source.config.vocab_size == tokenizer.vocab_size + EXTRA_ROWS
    assert_flat_equal(source.load_params(), flat(params))

    loaded_config, loaded, loaded_tokenizer = load_pretrained(layouts[layout])
    assert loaded_config == config
    assert_flat_equal(flat(loaded), flat(params))
    assert loaded_tokenizer.fingerprint == tokenizer.fingerprint


def test_load_pretrained_casts_and_places_on_a_mesh(layouts, checkpoint):
    config, params = checkpoint
    mesh = make_mesh(data=2, fsdp=4, tensor=1)  # d_model 24 splits 4 ways
    for layout in ("hf", "import"):
        loaded_config, loaded, _ = load_pretrained(
            layouts[layout], param_dtype="bfloat16", mesh=mesh
        )
        assert loaded_config == config.replace(param_dtype="bfloat16")
        for path, value in flat(loaded).items():
            assert isinstance(value.sharding, NamedSharding) and value.sharding.mesh == mesh
            assert value.dtype == np.dtype("bfloat16"), path
            expected = np.asarray(flat(params)[path]).astype("bfloat16")
            np.testing.assert_array_equal(np.asarray(value), expected, err_msg=path)
        embedding = flat(loaded)["token_embed/embedding"]
        assert embedding.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")


def test_a_directory_that_is_no_checkpoint_says_what_each_layout_needs(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(PretrainedError, match=r"holds \['notes.txt'\].*model.json \+ params/"):
        resolve_pretrained(tmp_path)
    with pytest.raises(PretrainedError, match="no such directory"):
        resolve_pretrained(tmp_path / "absent")
    (tmp_path / "checkpoints").mkdir()  # a run that has not ended
    with pytest.raises(PretrainedError, match="a training run without final parameters"):
        resolve_pretrained(tmp_path)
    (tmp_path / "checkpoints").rmdir()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    (tmp_path / "pytorch_model.bin").write_text("")
    with pytest.raises(InteropError, match=r"holds torch pickles \(\['pytorch_model.bin'\]\)"):
        resolve_pretrained(tmp_path)


def test_a_run_trained_with_another_tokenizer_is_refused(tmp_path, checkpoint, spiece):
    config, params = checkpoint
    other = SentencePieceTokenizer.train(sentences(300, seed=1), vocab_size=280, num_extra_ids=5)
    run = write_run_dir(tmp_path / "run", config, params, other, spiece)
    shutil.rmtree(run / "tokenizer")  # replaced by another tokenizer
    load_tokenizer(spiece).save(run / "tokenizer")
    with pytest.raises(Exception, match=r"was trained with tokenizer .* the run directory"):
        load_pretrained(run)


# --------------------------------------------------------------------------
# The run config against the checkpoint
# --------------------------------------------------------------------------
def finetune_config(init_from, **overrides):
    cfg = finetune.get_config()
    cfg.init_from = str(init_from)
    for key, value in overrides.items():
        cfg.model.overrides[key] = value
    return cfg


def test_the_model_config_is_the_checkpoints_with_runtime_fields(layouts, checkpoint, tokenizer):
    config, _ = checkpoint
    cfg = finetune_config(layouts["hf"])
    cfg.policy = "mixed_bf16"
    cfg.peft.method = "lora"
    mcfg = model_config(cfg, tokenizer)
    assert mcfg.vocab_size == tokenizer.vocab_size + EXTRA_ROWS  # more rows than ids loads
    assert mcfg.peft is not None and mcfg.peft.lora is not None
    assert (mcfg.param_dtype, mcfg.dtype) == (np.dtype("float32"), np.dtype("bfloat16"))
    assert mcfg.replace(peft=None, dtype="float32") == config
    # Unset placeholders keep the checkpoint's runtime values; set ones apply.
    cfg.model.overrides.dropout_rate = 0.25
    cfg.model.overrides.max_length = 96
    mcfg = model_config(cfg, tokenizer)
    assert (mcfg.dropout_rate, mcfg.max_length) == (0.25, 96)
    assert mcfg.attention_dropout_rate == config.attention_dropout_rate
    # A preset and overrides that agree with the checkpoint are accepted.
    cfg.model.preset = "tiny-t5"
    cfg.model.overrides = dict(
        activation="gated-gelu", tie_embeddings=False, relative_max_distance=17, d_model=24
    )
    assert model_config(cfg, tokenizer).replace(peft=None, dtype="float32") == config


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            dict(relative_max_distance=64),
            r"model\.overrides\.relative_max_distance=64 contradicts the checkpoint's 17 "
            r"\(init_from=.*\); remove it or set it to 17",
        ),
        (dict(d_model=32), r"model\.overrides\.d_model=32 contradicts the checkpoint's 24"),
        (
            dict(num_encoder_layers=3),
            r"model\.overrides\.num_encoder_layers=3 contradicts the checkpoint's 2",
        ),
        (
            dict(vocab_size=VOCAB),
            rf"model\.overrides\.vocab_size={VOCAB} contradicts the checkpoint's "
            rf"{VOCAB + EXTRA_ROWS}",
        ),
        (dict(param_dtype="bfloat16"), r"model\.overrides\.param_dtype is set by policy"),
        (dict(d_modle=24), r"model\.overrides\.d_modle is not a TransformerConfig field"),
    ],
)
def test_an_override_that_contradicts_the_checkpoint_is_one_error(
    layouts, tokenizer, change, message
):
    assert tokenizer.vocab_size == VOCAB
    cfg = finetune_config(layouts["import"], **change)
    with pytest.raises(PretrainedError, match=message):
        model_config(cfg, tokenizer)


def test_a_contradicting_preset_names_each_field_in_one_error(layouts, tokenizer):
    cfg = finetune_config(layouts["run"])
    cfg.model.preset = "tiny-t5"  # T5 v1.0: relu, tied head, relative_max_distance 20
    with pytest.raises(PretrainedError) as error:
        model_config(cfg, tokenizer)
    text = str(error.value)
    assert "model.preset='tiny-t5' has activation='relu', which contradicts the checkpoint's " in (
        text
    )
    assert "has tie_embeddings=True, which contradicts the checkpoint's False" in text
    assert "has relative_max_distance=20, which contradicts the checkpoint's 17" in text
    assert "vocab_size" not in text and "dropout" not in text  # not chosen by presets / runtime
    assert text.count("\n  - ") == 3


def test_a_preset_of_the_other_family_is_reported_alone(layouts, tokenizer):
    cfg = finetune_config(layouts["hf"])
    cfg.model.preset = "tiny-llama"
    with pytest.raises(
        PretrainedError,
        match=r"model\.preset='tiny-llama' is decoder-only \(LLaMA family\), the checkpoint "
        r"\(init_from=.*\) is encoder-decoder \(T5 family\): the family contradicts it",
    ):
        model_config(cfg, tokenizer)


def test_a_tokenizer_with_more_ids_than_the_embedding_is_refused(tmp_path, tokenizer, spiece):
    config = get_config("tiny-t5", vocab_size=tokenizer.vocab_size - 3)
    directory = save_flaxtune(
        tmp_path / "small", config, random_params(config), tokenizer_path=spiece
    )
    with pytest.raises(
        PretrainedError,
        match=rf"the tokenizer has {VOCAB} ids, but the checkpoint's embedding .* has "
        rf"{VOCAB - 3} rows",
    ):
        model_config(finetune_config(directory), tokenizer)


def test_no_preset_and_no_init_from_says_what_to_set(tokenizer):
    cfg = finetune.get_config()
    with pytest.raises(PretrainedError, match=r"model\.preset='' .* set init_from=PATH"):
        model_config(cfg, tokenizer)


# --------------------------------------------------------------------------
# Runs that start from each layout
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def task(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    pairs = zip(sentences(24, seed=5), sentences(24, seed=6), strict=True)
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs))
    register_user_task(TASK, {"train": path, "validation": path}, overwrite=True)
    return TASK


def one_step_config(init_from, task, **peft):
    """One step at learning rate 0: the final parameters are the initial ones."""
    cfg = finetune_config(init_from)
    cfg.data.tasks = task
    cfg.data.batch_size = 8
    cfg.data.inputs_length, cfg.data.targets_length = 16, 12
    cfg.optimizer.learning_rate = 0.0
    cfg.optimizer.schedule = "constant"
    cfg.optimizer.warmup_steps = 0
    cfg.train.num_steps = cfg.train.log_every = cfg.train.eval_every = 1
    cfg.train.checkpoint_every = 1
    cfg.eval.num_batches = 1
    cfg.eval.generate_examples = 0
    for key, value in peft.items():
        setattr(cfg.peft, key, value)
    return cfg


@pytest.mark.parametrize("layout", ["run", "import", "hf", "hf_sharded"])
def test_the_initial_state_is_the_checkpoint_bit_for_bit(
    layouts, layout, checkpoint, task, tmp_path
):
    """The run's setup alone (no step): its train state holds the checkpoint's parameters."""
    _, params = checkpoint
    run = _setup(one_step_config(layouts[layout], task), tmp_path)
    try:
        state = run.trainer.state
        assert not flat(state.frozen)  # full fine-tuning: everything trains
        assert_flat_equal(flat(state.trainable), flat(params))
    finally:
        run.ckpt.close()


def test_a_quantized_base_and_pissa_start_from_the_loaded_weights(
    layouts, checkpoint, task, tmp_path
):
    _, params = checkpoint
    expected = flat(params)
    cfg = one_step_config(layouts["import"], task, method="lora")
    cfg.quant.base = "int8"
    run = _setup(cfg, tmp_path)
    try:
        frozen = flat(run.trainer.state.frozen)
        specs = run.trainer.spec.frozen_base.specs
        assert specs
        for path, spec in specs.items():
            codes = spec.apply(expected[path])
            np.testing.assert_array_equal(frozen[path].values, codes.values, err_msg=path)
            np.testing.assert_array_equal(frozen[path].scale, codes.scale, err_msg=path)
    finally:
        run.ckpt.close()

    cfg = one_step_config(layouts["hf"], task, method="lora")
    cfg.peft.lora.init = "pissa"
    (tmp_path / "pissa").mkdir()
    run = _setup(cfg, tmp_path / "pissa")
    try:
        state = flat(run.trainer.state.params)
        query = "encoder/layers_1/attention/query"
        kernel = expected[f"{query}/kernel"]
        a, b = np.asarray(state[f"{query}/lora_a"]), np.asarray(state[f"{query}/lora_b"])
        scaling = cfg.peft.lora.alpha / cfg.peft.lora.rank
        delta = scaling * (a @ b.reshape(a.shape[1], -1)).reshape(kernel.shape)
        rebuilt = np.asarray(state[f"{query}/kernel"]) + delta
        # PiSSA splits the loaded kernel, not a random draw: the parts add up to it.
        np.testing.assert_allclose(rebuilt, kernel, rtol=1e-5, atol=1e-5)
        assert np.abs(np.asarray(state[f"{query}/kernel"]) - kernel).max() > 0.1
    finally:
        run.ckpt.close()


def test_a_peft_run_is_continued_or_merged_and_other_peft_runs_are_refused(
    tmp_path, checkpoint, tokenizer, spiece
):
    config, _ = checkpoint
    lora = LoraConfig(rank=2, alpha=6.0)
    trained = random_params(config.replace(peft=PeftConfig(lora=lora)), seed=4)
    run = write_run_dir(
        tmp_path / "lora", config.replace(peft=PeftConfig(lora=lora)), trained, tokenizer, spiece
    )
    source = resolve_pretrained(run)
    values = start_values(source, None)
    weights = flat(trained)
    assert not any("/lora_" in p for p in values)
    query = "decoder/layers_0/attention/query"
    kernel = np.asarray(weights[f"{query}/kernel"])
    a, b = np.asarray(weights[f"{query}/lora_a"]), np.asarray(weights[f"{query}/lora_b"])
    merged = kernel + 3.0 * (a.reshape(-1, 2) @ b.reshape(2, -1)).reshape(kernel.shape)
    np.testing.assert_allclose(values[f"{query}/kernel"], merged, rtol=1e-6, atol=1e-6)
    key = "decoder/layers_0/attention/key/kernel"  # not a LoRA target: as trained
    np.testing.assert_array_equal(values[key], weights[key])
    # A run with the same LoRA continues it: base and adapter as trained.
    assert_flat_equal(start_values(source, PeftConfig(lora=lora)), weights)
    # load_pretrained keeps the run as it was trained, PEFT parameters and config.
    loaded_config, loaded, _ = load_pretrained(run)
    assert loaded_config.peft == PeftConfig(lora=lora)
    assert_flat_equal(flat(loaded), weights)

    adapters = config.replace(peft=PeftConfig(adapters=AdapterConfig()))
    run = write_run_dir(tmp_path / "adapters", adapters, random_params(adapters), tokenizer, spiece)
    source = resolve_pretrained(run)
    with pytest.raises(PretrainedError, match=r"trained with PEFT \['adapters'\], whose"):
        start_values(source, PeftConfig(lora=lora))
    assert len(start_values(source, adapters.peft)) == len(flat(random_params(adapters)))


# Each full run takes ~30 s on a loaded 2-core machine: one runs by default, the
# others (the same path after resolve_pretrained) under -m slow.
@pytest.mark.parametrize(
    "layout",
    [
        "run",
        pytest.param("import", marks=pytest.mark.slow),
        pytest.param("hf_sharded", marks=pytest.mark.slow),
    ],
)
def test_a_one_step_run_starts_from_the_checkpoint_bit_for_bit(
    layouts, layout, checkpoint, tokenizer, task, tmp_path
):
    config, params = checkpoint
    workdir = tmp_path / "run"
    train_and_evaluate(one_step_config(layouts[layout], task), workdir)
    assert load_tokenizer(workdir / "tokenizer").fingerprint == tokenizer.fingerprint
    assert_flat_equal(flat(restore_params(workdir)), flat(params))
    # The new run is itself a checkpoint with the same architecture.
    assert resolve_pretrained(workdir).config == config


def test_a_lora_run_from_a_checkpoint_keeps_its_base_and_names_its_tokenizer(
    layouts, checkpoint, spiece, task, tmp_path
):
    _, params = checkpoint
    cfg = one_step_config(layouts["hf"], task, method="lora")
    cfg.tokenizer.path = str(spiece)  # the same tokenizer: accepted
    train_and_evaluate(cfg, tmp_path / "lora")
    saved = flat(restore_params(tmp_path / "lora"))
    lora = {p: v for p, v in saved.items() if "/lora_" in p}
    assert lora and all(not np.any(v) for p, v in lora.items() if p.endswith("lora_b"))
    assert_flat_equal({p: v for p, v in saved.items() if p not in lora}, flat(params))
    # A LoRA run is a checkpoint too: its merged weights (here the base: B = 0).
    source = resolve_pretrained(tmp_path / "lora")
    assert source.config.peft is not None
    assert_flat_equal(start_values(source, None), flat(params))


def test_a_different_tokenizer_path_is_refused(layouts, task, tmp_path):
    other = tmp_path / "other.model"
    SentencePieceTokenizer.train(sentences(300, seed=1), vocab_size=280, num_extra_ids=5).save(
        other
    )
    cfg = one_step_config(layouts["import"], task)
    cfg.tokenizer.path = str(other)
    # Refused by the run config's validation, before the run starts ...
    with pytest.raises(RunConfigError, match=r"init_from=.* was trained with tokenizer .* run's"):
        train_and_evaluate(cfg, tmp_path / "run")
    # ... and by the loop's own reader of the checkpoint's tokenizer.
    source = resolve_pretrained(layouts["import"])
    with pytest.raises(PretrainedError, match=r"tokenizer\.path=.* is not the tokenizer of"):
        pretrained_tokenizer(cfg, tmp_path, source)


def test_a_checkpoint_without_tokenizer_needs_tokenizer_path(
    tmp_path, checkpoint, tokenizer, spiece
):
    config, params = checkpoint
    directory = export_hf(params, config, tmp_path / "bare")  # no tokenizer file
    source = resolve_pretrained(directory)
    cfg = finetune_config(directory)
    with pytest.raises(PretrainedError, match=r"holds no tokenizer: set tokenizer\.path"):
        pretrained_tokenizer(cfg, tmp_path, source)
    cfg.tokenizer.path = str(spiece)
    assert pretrained_tokenizer(cfg, tmp_path, source).fingerprint == tokenizer.fingerprint
    assert load_tokenizer(tmp_path / "tokenizer").fingerprint == tokenizer.fingerprint
    with pytest.raises(PretrainedError, match=r"holds no tokenizer \(one of"):
        load_pretrained(directory)


@pytest.mark.hf
def test_a_transformers_t5_v1_1_directory_starts_a_run(tmp_path, spiece, tokenizer, task):
    from tests.interop.test_hf_parity import hf_model_dir

    model, directory = hf_model_dir(
        tmp_path,
        "t5-v1.1",  # gated-GELU, its own head, 2 encoder and 3 decoder layers
        vocab_size=tokenizer.vocab_size + EXTRA_ROWS,
        relative_attention_max_distance=17,
        pad_token_id=0,
        eos_token_id=1,
    )
    shutil.copyfile(spiece, directory / "spiece.model")

    source = resolve_pretrained(directory)
    assert source.kind == "hf"
    expected = import_hf(directory)
    assert source.config == expected.config
    config = source.config
    assert (config.num_encoder_layers, config.num_decoder_layers) == (2, 3)
    assert (config.vocab_size, config.relative_max_distance) == (tokenizer.vocab_size + 7, 17)
    assert config.activation == "gated-gelu" and not config.tie_embeddings
    torch_embedding = model.shared.weight.detach().numpy()
    np.testing.assert_array_equal(flat(expected.params)["token_embed/embedding"], torch_embedding)

    train_and_evaluate(one_step_config(directory, task), tmp_path / "run")
    assert_flat_equal(flat(restore_params(tmp_path / "run")), flat(expected.params))
