"""Base configuration of a flaxtune run; every other config starts from it.

Each field has a comment above it. Override on the command line, e.g.
``--config.optimizer.learning_rate=3e-4``; an unknown key is an error.
"""

import ml_collections
from ml_collections import config_dict

from flaxtune.data.tasks import BUNDLED_TASKS
from flaxtune.train.run_config import DEFAULT_DATA_TASKS, peft_section


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Seed of parameter init, data order, dropout and tokenizer training.
    c.seed = 0
    # Compute policy: fp32 | bf16 | mixed_bf16 | fp16, or a string like "p=f32,c=bf16,o=f32".
    c.policy = "fp32"
    # A checkpoint whose parameters initialize this run ("" = none): a finished run's workdir,
    # a `python -m flaxtune.interop import` directory or a Hugging Face model directory. Its
    # architecture, vocabulary and tokenizer apply (flaxtune/train/pretrained.py).
    c.init_from = ""

    c.model = ml_collections.ConfigDict()
    # A preset of flaxtune.transformer (see preset_names()); "" = init_from's architecture.
    c.model.preset = "tiny-t5"
    # Field overrides of the preset (the vocabulary size comes from the tokenizer). With
    # init_from, the preset and every override but the runtime fields (RUNTIME_FIELDS in
    # flaxtune/train/run_config.py: dropout, max_length but of learned positions, attention
    # numerics and implementation, remat, scan) must agree with the checkpoint.
    c.model.overrides = ml_collections.ConfigDict(
        dict(
            d_model=128,
            num_heads=4,
            head_dim=32,
            d_ff=384,
            num_encoder_layers=2,
            num_decoder_layers=2,
            relative_num_buckets=32,
            relative_max_distance=64,
            max_length=256,
            dropout_rate=0.0,
            # How attention, memory and compilation are handled, not what the model
            # computes (flaxtune/transformer/config.py): None keeps the preset's
            # (einsum attention, no remat, one compiled block per layer).
            attention_impl=config_dict.placeholder(str),
            remat_policy=config_dict.placeholder(str),
            scan_layers=config_dict.placeholder(bool),
        )
    )

    # Parameter-efficient fine-tuning. The section is generated from the method registry
    # (flaxtune.peft.METHODS), so every option of every method is here; each field is
    # documented below and in its config class (flaxtune/peft/config.py). Defaults are the
    # classes' except PEFT_RUN_DEFAULTS (flaxtune/train/run_config.py): adapters with
    # reduction_factor 8, prompt and prefix tuning with 16 virtual tokens, prompts from the
    # vocabulary. Options of a method other than peft.method must keep their defaults (an
    # error otherwise: they would do nothing). Named settings (dora, qlora, houlsby,
    # bitfit, ...) are flaxtune.peft.RECIPES; e.g. DoRA is peft.method=lora with
    # peft.lora.use_dora=True.
    #
    # peft.method: none | lora | adapters | ia3 | prompt_tuning | prefix_tuning
    #   (none with no selective rule below: full fine-tuning).
    # peft.lora (LoraConfig), the update W + scaling * A @ B:
    #   targets: module-path regex or preset (qv, qkvo, ffn, all-linear).
    #   rank: rank of A @ B.
    #   alpha: scaling is alpha / rank (alpha / sqrt(rank) with use_rslora).
    #   dropout: dropout on the LoRA branch's input.
    #   use_rslora: rank-stabilized scaling.
    #   init: kaiming | gaussian (A's draw; B = 0) | pissa (A, B from the kernel's top-rank
    #     SVD, the kernel keeps the rest; applied once the base is loaded).
    #   use_dora: DoRA, a trainable magnitude per output feature.
    #   overrides: (regex, rank, alpha) triples; the first that matches a layer sets its own
    #     (an entry that sets no layer is an error).
    # peft.adapters (AdapterConfig), bottleneck adapters h + up(act(down(h))):
    #   kind: houlsby (after attention and FFN) | pfeiffer (after FFN only).
    #   reduction_factor: the bottleneck width is d_model // reduction_factor.
    #   activation: relu | gelu | silu | tanh.
    # peft.ia3 (IA3Config), learned rescaling vectors:
    #   keys, values, mlp: rescale the keys, the values, the FFN hidden activation.
    # peft.prompt_tuning (PromptTuningConfig), trainable input embeddings:
    #   num_virtual_tokens: how many.
    #   init: random | vocab (embedding rows of token ids drawn with init_seed) | text
    #     (rows of init_token_ids); applied once the base is loaded.
    #   init_token_ids: the token ids of init=text, repeated to length (an error otherwise).
    #   init_seed: seed of the token ids of init=vocab (an error with another init).
    # peft.prefix_tuning (PrefixTuningConfig), trainable keys and values in every attention:
    #   num_virtual_tokens: how many.
    #   reparameterize: produce them by an MLP from a trainable embedding (Li & Liang 2021).
    #   hidden: the width of that MLP (an error without reparameterize).
    # peft.selective (SelectiveConfig), original parameters that train too:
    #   rules: presets: bitfit (biases; norm scales without biases), attention, ffn,
    #     embeddings, head, norms.
    #   last_layers: train the last N blocks of every stack (0: none).
    c.peft = peft_section()

    c.quant = ml_collections.ConfigDict()
    # Quantize the frozen base's Dense kernels: "" (float) | int8 | int4 | nf4 (QLoRA is
    # nf4 with peft.method=lora). Needs frozen kernels: an error under full fine-tuning.
    c.quant.base = ""
    # Largest scale group along a kernel's contraction (per kernel, the largest power of two
    # <= this dividing it; 4-bit kernels with an odd contraction stay float); 0 = one group.
    c.quant.group_size = 64
    # Quantize the scales too (QLoRA's double quantization).
    c.quant.double_quant = False
    # Also quantize the untied output projection (the token embedding is never quantized).
    c.quant.include_head = False
    # Store the frozen float parameters in the policy's compute dtype (bf16 under mixed_bf16);
    # False keeps them in the param dtype. Trainable parameters always stay in the param dtype.
    c.quant.frozen_in_compute_dtype = True

    c.tokenizer = ml_collections.ConfigDict()
    # A SentencePiece .model file; empty trains one on the bundled corpus.
    c.tokenizer.path = ""
    # Vocabulary size when training the tokenizer.
    c.tokenizer.vocab_size = 2000

    c.data = ml_collections.ConfigDict()
    # A task, a comma-free mixture name (bundled/all) or a task list. Not used when
    # data.train is set (it must then stay at this default or be "": an error otherwise).
    c.data.tasks = DEFAULT_DATA_TASKS
    # Training data in place of data.tasks ("" = use data.tasks): a .jsonl/.json, .csv or
    # .parquet file, a registered task or mixture name (its train split), or a TFDS dataset
    # name such as "glue/sst2" (its train split; read by the registered task for that
    # dataset if there is one, else through data.input_key/target_key). A file holds
    # prompt/completion records, or chat records {"messages": [{"role", "content"}, ...]}
    # rendered with the tokenizer's chat template, loss on the assistant turns only
    # (decoder-only models). A bad line is an error naming the file and line.
    c.data.train = ""
    # Validation data, the same forms (a task or TFDS name: its validation split). ""
    # with data.train set: no validation loss is computed (train.best_metric must then
    # not be eval/loss) and nothing is held out of data.train. "" without data.train:
    # data.tasks' validation split. With eval.tasks at its default and data.train set,
    # generation scores (eval.generate_examples) are taken on this data too.
    c.data.validation = ""
    # Field of the prompt in data.train/validation records (a TFDS feature for a TFDS
    # name without a registered task). At "input", "prompt" and "inputs" count too;
    # any other value is the only name accepted.
    c.data.input_key = "input"
    # Field of the completion; at "target", "completion" and "targets" count too.
    c.data.target_key = "target"
    # instruction | span_corruption | span_reconstruction | causal_lm
    c.data.objective = "instruction"
    # Encoder length (encoder-decoder) in tokens.
    c.data.inputs_length = 96
    # Decoder length in tokens.
    c.data.targets_length = 48
    # Global batch size (a multiple of mesh data x fsdp).
    c.data.batch_size = 32
    # Pack several examples per row.
    c.data.pack = False
    # Where datasets are read and the bundled dataset is built (once, then shared by every
    # run that names the same directory): "" = DEFAULT_DATA_DIR of flaxtune/train/run_config.py,
    # ~/tensorflow_datasets (TFDS's default). Set it to keep a run's data elsewhere, e.g.
    # inside its workdir.
    c.data.data_dir = ""
    # Loader prefetch threads (0 = in the training thread). The loop already makes the
    # next batch while the device runs the current step; threads pay off only when a
    # batch takes longer than a step, and on a CPU-only host they take cores from XLA
    # (one thread costs ~10 ms of CPU per seed-study batch, for the same batches).
    c.data.read_threads = 0

    c.optimizer = ml_collections.ConfigDict()
    # adamw | adafactor | sgd
    c.optimizer.name = "adamw"
    # Peak learning rate.
    c.optimizer.learning_rate = 3e-3
    # constant | warmup_cosine | linear | inverse_sqrt
    c.optimizer.schedule = "warmup_cosine"
    # Linear warm-up steps.
    c.optimizer.warmup_steps = 50
    # Decoupled weight decay (masked off biases, norms and embeddings).
    c.optimizer.weight_decay = 0.01
    # Global-norm gradient clipping (0 disables).
    c.optimizer.clip_global_norm = 1.0
    # Microbatches accumulated per update.
    c.optimizer.grad_accum_steps = 1

    c.train = ml_collections.ConfigDict()
    # Optimizer updates.
    c.train.num_steps = 600
    # Log metrics every N steps.
    c.train.log_every = 20
    # Validation loss every N steps.
    c.train.eval_every = 200
    # Checkpoint every N steps.
    c.train.checkpoint_every = 200
    # Checkpoints to keep (plus the best one when best_metric is set).
    c.train.keep_checkpoints = 2
    # Metric that picks the best checkpoint ("" = none), e.g. "eval/loss".
    c.train.best_metric = "eval/loss"
    # min | max
    c.train.best_mode = "min"
    # Label smoothing of the cross-entropy.
    c.train.label_smoothing = 0.0
    # z-loss coefficient.
    c.train.z_loss = 0.0
    # Non-finite steps in a row (loss, gradients or update; a float16 loss
    # scale's skipped steps count) that stop the run with an error.
    c.train.max_nonfinite_steps = 10

    c.eval = ml_collections.ConfigDict()
    # Validation batches per evaluation.
    c.eval.num_batches = 8
    # Tasks scored by generation at the end (comma-separated; "" = none).
    c.eval.tasks = ",".join(BUNDLED_TASKS)
    # Also score generation on the validation split at every evaluation (slower;
    # lets train.best_metric be e.g. "eval/bundled/sentiment/accuracy").
    c.eval.generate_during_training = False
    # Split scored by generation at the end of the run.
    c.eval.split = "test"
    # Examples per task scored by generation (0 disables generation).
    c.eval.generate_examples = 64
    # greedy | sample | beam
    c.eval.decode_method = "greedy"
    # Beam width for decode_method=beam.
    c.eval.num_beams = 4
    # Tokens generated per example.
    c.eval.max_new_tokens = 48
    # Prompts per generation batch.
    c.eval.batch_size = 32

    # Trace train steps with jax.profiler into WORKDIR/profile (TensorBoard's profile
    # plugin, Perfetto): "START:STOP" traces the steps from state START to state STOP,
    # e.g. "10:15"; "" = off (flaxtune/train/profiling.py).
    c.profile_steps = ""

    # Several processes (hosts, or one per accelerator) in one run through
    # jax.distributed (flaxtune/train/distributed.py). Every process runs the same command
    # with the same workdir on a shared file system; process 0 writes the run's files.
    c.distributed = ml_collections.ConfigDict()
    # auto | on | off. auto: on when a coordinator is named (below or JAX_COORDINATOR_ADDRESS)
    # or JAX detects a cluster of more than one process (TPU VM slice, SLURM, Open MPI).
    c.distributed.enabled = "auto"
    # host:port of process 0's coordinator ("" = JAX_COORDINATOR_ADDRESS or the cluster's).
    c.distributed.coordinator_address = ""
    # Processes in the run (0 = from the cluster).
    c.distributed.num_processes = 0
    # This process's index, 0..num_processes-1 (-1 = from the cluster).
    c.distributed.process_id = -1
    # Comma-separated ids of the local accelerators this process uses ("" = all, or the
    # cluster's per-process assignment).
    c.distributed.local_device_ids = ""
    # Seconds to wait for every process to connect at the start.
    c.distributed.initialization_timeout_s = 300
    # Seconds without a heartbeat after which a process counts as dead: every other
    # process then exits with an error (the bound on how long a dead peer can stall a run).
    c.distributed.heartbeat_timeout_s = 100

    c.mesh = ml_collections.ConfigDict()
    # Devices on the data axis (-1 = all remaining).
    c.mesh.data = -1
    # Devices on the fsdp axis.
    c.mesh.fsdp = 1
    # Devices on the tensor axis.
    c.mesh.tensor = 1
    return c
