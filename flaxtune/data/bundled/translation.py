"""A rule-based English→Chinese grammar for the translation task.

Both sides are generated from one abstract sentence, so the Chinese reference
is a real sentence and not a word-by-word gloss:

    subject  [negation|future]  verb  object   [place]  [time]      (English)
    subject  time  [不|没有|会]  place  verb  [了]  object            (Chinese)

Counted objects use the right measure word (一本书, 两杯咖啡), adjectives go
in front of the noun (一个大苹果, 一只黑色的猫), and negated sentences use
a bare plural object (汤姆不吃苹果。) as English and Chinese both prefer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from flaxtune.data.bundled.world import CITIES, PEOPLE


@dataclass(frozen=True)
class Noun:
    singular: str
    plural: str
    zh: str
    measure: str
    category: str


NOUNS = (
    Noun("apple", "apples", "苹果", "个", "food"),
    Noun("orange", "oranges", "橙子", "个", "food"),
    Noun("banana", "bananas", "香蕉", "根", "food"),
    Noun("sandwich", "sandwiches", "三明治", "个", "food"),
    Noun("cake", "cakes", "蛋糕", "块", "food"),
    Noun("bowl of rice", "bowls of rice", "米饭", "碗", "food"),
    Noun("bowl of noodles", "bowls of noodles", "面条", "碗", "food"),
    Noun("cup of tea", "cups of tea", "茶", "杯", "drink"),
    Noun("cup of coffee", "cups of coffee", "咖啡", "杯", "drink"),
    Noun("glass of milk", "glasses of milk", "牛奶", "杯", "drink"),
    Noun("glass of water", "glasses of water", "水", "杯", "drink"),
    Noun("bottle of juice", "bottles of juice", "果汁", "瓶", "drink"),
    Noun("book", "books", "书", "本", "reading"),
    Noun("newspaper", "newspapers", "报纸", "份", "reading"),
    Noun("magazine", "magazines", "杂志", "本", "reading"),
    Noun("letter", "letters", "信", "封", "writing"),
    Noun("story", "stories", "故事", "个", "writing"),
    Noun("poem", "poems", "诗", "首", "writing"),
    Noun("cat", "cats", "猫", "只", "animal"),
    Noun("dog", "dogs", "狗", "只", "animal"),
    Noun("bird", "birds", "鸟", "只", "animal"),
    Noun("horse", "horses", "马", "匹", "animal"),
    Noun("car", "cars", "车", "辆", "thing"),
    Noun("bicycle", "bicycles", "自行车", "辆", "thing"),
    Noun("computer", "computers", "电脑", "台", "thing"),
    Noun("umbrella", "umbrellas", "伞", "把", "thing"),
    Noun("chair", "chairs", "椅子", "把", "thing"),
    Noun("shirt", "shirts", "衬衫", "件", "thing"),
    Noun("pair of shoes", "pairs of shoes", "鞋", "双", "thing"),
    Noun("movie", "movies", "电影", "部", "watching"),
    Noun("song", "songs", "歌", "首", "music"),
)


@dataclass(frozen=True)
class Verb:
    base: str
    third: str
    past: str
    zh: str
    categories: tuple[str, ...]


VERBS = (
    Verb("eat", "eats", "ate", "吃", ("food",)),
    Verb("drink", "drinks", "drank", "喝", ("drink",)),
    Verb("buy", "buys", "bought", "买", ("food", "drink", "reading", "thing", "animal")),
    Verb("read", "reads", "read", "读", ("reading", "writing")),
    Verb("write", "writes", "wrote", "写", ("writing",)),
    Verb("see", "sees", "saw", "看见", ("animal", "thing")),
    Verb("draw", "draws", "drew", "画", ("animal", "thing", "food")),
    Verb("want", "wants", "wanted", "想要", ("food", "drink", "thing", "animal", "reading")),
    Verb("watch", "watches", "watched", "看", ("watching",)),
    Verb("sing", "sings", "sang", "唱", ("music",)),
    Verb("sell", "sells", "sold", "卖", ("food", "thing", "reading")),
    Verb("find", "finds", "found", "找到", ("thing", "animal", "reading")),
)

# (english adjective, chinese prenominal form); only for concrete nouns.
ADJECTIVES = (
    ("big", "大"),
    ("small", "小"),
    ("new", "新"),
    ("old", "旧"),
    ("red", "红色的"),
    ("black", "黑色的"),
    ("white", "白色的"),
    ("beautiful", "漂亮的"),
    ("cheap", "便宜的"),
)
_ADJ_CATEGORIES = ("thing", "animal", "reading", "food")

PRONOUNS = (  # english, chinese, third person singular?
    ("I", "我", False),
    ("You", "你", False),
    ("He", "他", True),
    ("She", "她", True),
    ("We", "我们", False),
    ("They", "他们", False),
)
COUNT_EN = ("", "a", "two", "three", "four", "five")
COUNT_ZH = ("", "一", "两", "三", "四", "五")

PLACES = (
    ("in the park", "在公园"),
    ("at home", "在家"),
    ("at school", "在学校"),
    ("in the library", "在图书馆"),
    ("at the market", "在市场"),
    ("in the kitchen", "在厨房"),
    ("at the station", "在车站"),
)
TIMES = {
    "present": (("every day", "每天"), ("every morning", "每天早上"), ("on Sundays", "每个星期天")),
    "past": (
        ("yesterday", "昨天"),
        ("last week", "上个星期"),
        ("last night", "昨天晚上"),
        ("this morning", "今天早上"),
    ),
    "future": (("tomorrow", "明天"), ("next week", "下个星期"), ("tonight", "今天晚上")),
}


@dataclass(frozen=True)
class Translation:
    english: str
    chinese: str
    combo: str


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def sample_translation(rng: random.Random) -> Translation:
    """Draws one abstract sentence and realizes it in both languages."""
    # Subject: a pronoun, a name, or two names joined by "and".
    kind = rng.random()
    if kind < 0.4:
        subj_en, subj_zh, third = rng.choice(PRONOUNS)
        subj_key = subj_en
    elif kind < 0.85:
        person = rng.choice(PEOPLE)
        subj_en, subj_zh, third, subj_key = person.en, person.zh, True, person.en
    else:
        a, b = rng.sample(PEOPLE, 2)
        subj_en, subj_zh, third = f"{a.en} and {b.en}", f"{a.zh}和{b.zh}", False
        subj_key = "pair"
    verb = rng.choice(VERBS)
    noun = rng.choice([n for n in NOUNS if n.category in verb.categories])
    tense = rng.choice(("present", "past", "future"))
    negated = tense != "future" and rng.random() < 0.2

    if negated:
        obj_en, obj_zh = noun.plural, noun.zh
        if tense == "present":
            verb_en = f"{'does' if third else 'do'} not {verb.base}"
            aux_zh, verb_zh = "不", verb.zh
        else:
            verb_en, aux_zh, verb_zh = f"did not {verb.base}", "没有", verb.zh
    else:
        count = rng.choice((1, 1, 1, 2, 3, 4, 5))
        adj_en, adj_zh = ("", "")
        if noun.category in _ADJ_CATEGORIES and " of " not in noun.singular and rng.random() < 0.4:
            adj_en, adj_zh = rng.choice(ADJECTIVES)
        head = noun.singular if count == 1 else noun.plural
        words = f"{adj_en} {head}".strip()
        det = _article(words) if count == 1 else COUNT_EN[count]
        obj_en = f"{det} {words}"
        obj_zh = f"{COUNT_ZH[count]}{noun.measure}{adj_zh}{noun.zh}"
        if tense == "present":
            verb_en, aux_zh, verb_zh = (verb.third if third else verb.base), "", verb.zh
        elif tense == "past":
            verb_en, aux_zh, verb_zh = verb.past, "", f"{verb.zh}了"
        else:
            verb_en, aux_zh, verb_zh = f"will {verb.base}", "会", verb.zh

    place_en = place_zh = time_en = time_zh = ""
    if rng.random() < 0.45:
        if rng.random() < 0.3:
            city_en, city_zh = rng.choice(CITIES)
            place_en, place_zh = f"in {city_en}", f"在{city_zh}"
        else:
            place_en, place_zh = rng.choice(PLACES)
    if rng.random() < 0.55:
        time_en, time_zh = rng.choice(TIMES[tense])

    english = " ".join(w for w in (subj_en, verb_en, obj_en, place_en, time_en) if w) + "."
    # Negation and 会 come before the 在-phrase: 他明天会在公园买苹果。
    chinese = f"{subj_zh}{time_zh}{aux_zh}{place_zh}{verb_zh}{obj_zh}。"
    return Translation(english, chinese, combo=f"{subj_key}|{verb.base}|{noun.singular}")
