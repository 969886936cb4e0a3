"""Per-task generators of the bundled instruction data.

Each generator draws one example from a ``random.Random`` and returns a
:class:`Sample`: the task's named ``fields`` (what a template may show), the
reference ``target`` and a ``combo`` key. The combo names the lexical
combination the example is built from (e.g. subject|verb|noun for
translation); the builder assigns whole combos to splits, so validation and
test hold combinations never seen in training while every single word is
seen. Generators never look at the split.

Examples are kept short on purpose (most prompts < 64 SentencePiece tokens,
targets < 32) so that a small model trained for minutes on a CPU can learn
them.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

from flaxtune.data.bundled import world as w
from flaxtune.data.bundled.topics import TOPICS
from flaxtune.data.bundled.translation import sample_translation


@dataclass(frozen=True)
class Sample:
    fields: dict[str, str]
    target: str
    combo: str
    meta: dict[str, str] = field(default_factory=dict)


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


# ---------------------------------------------------------------- sentiment

_THINGS = (
    "phone",
    "laptop",
    "movie",
    "hotel room",
    "restaurant",
    "book",
    "concert",
    "service",
    "pizza",
    "coffee",
    "camera",
    "train ride",
    "jacket",
    "game",
    "museum tour",
    "haircut",
    "sofa",
    "app",
    "lecture",
    "soup",
)
_POSITIVE = (
    "great",
    "wonderful",
    "excellent",
    "amazing",
    "fantastic",
    "lovely",
    "delightful",
    "superb",
    "perfect",
    "brilliant",
)
_NEGATIVE = (
    "terrible",
    "awful",
    "disappointing",
    "horrible",
    "poor",
    "dreadful",
    "boring",
    "useless",
    "bad",
    "annoying",
)
_FEELINGS = {"positive": ("great", "happy", "wonderful", "glad"), "negative": ("sad", "awful")}
_FEELINGS["negative"] += ("miserable", "upset")


def sentiment(rng: random.Random) -> Sample:
    thing = rng.choice(_THINGS)
    form = rng.randrange(8)
    label = rng.choice(("positive", "negative", "neutral"))
    if label == "neutral":
        options = (
            f"The {thing} arrived on {rng.choice(w.WEEKDAYS)}.",
            f"I bought the {thing} in {rng.choice(w.CITIES)[0]}.",
            f"The {thing} is {rng.choice(w.COLORS)}.",
            f"My friend told me about the {thing} last week.",
            f"The {thing} costs {rng.randrange(5, 200)} dollars.",
        )
        idx = form % len(options)
        return Sample({"text": options[idx]}, "neutral", f"neutral{idx}|{thing}")
    if form == 0:
        feeling = rng.choice(_FEELINGS[label])
        day = rng.choice(("today", "this morning", "after work", "this week"))
        return Sample({"text": f"I feel {feeling} {day}."}, label, f"feel|{feeling}|{day}")
    # Negation flips the polarity of the adjective: the model must read "not".
    # "not <positive>" reads as negative; "not <negative>" is only lukewarm, so
    # negation is generated for negative examples alone.
    negated = form in (6, 7) and label == "negative"
    adj_pool = _NEGATIVE if label == "negative" and not negated else _POSITIVE
    adj = rng.choice(adj_pool)
    not_ = " not" if negated else ""
    patterns = (
        f"The {thing} was{not_} {adj}.",
        f"I think the {thing} is{not_} {adj}.",
        f"This {thing} is{not_} {adj}, honestly.",
        f"Our {thing} was{not_} {adj} at all.",
        f"Honestly, the {thing} was{not_} {adj}.",
    )
    pattern = form % len(patterns)
    text = patterns[pattern]
    if form == 5:
        recommend = "would happily recommend" if label == "positive" else "would never recommend"
        text = f"The {thing} was {adj}; I {recommend} it."
        pattern = "recommend"
    # The combo is a function of the text, so one text never lands in two splits.
    return Sample({"text": text}, label, f"{pattern}|{bool(not_)}|{thing}|{adj}")


# ---------------------------------------------------------------- summarization

_SHOPS = ("bakery", "bookshop", "cafe", "flower shop", "bike shop", "small restaurant")
_FILLERS = (
    "The weather was mild that day.",
    "Many neighbours came to see what was happening.",
    "Local newspapers wrote about it the next morning.",
    "It was a busy week in the town.",
    "Some people stopped to take photos.",
    "The street was full of cars and buses.",
)


def summarization(rng: random.Random) -> Sample:
    p = rng.choice(w.PEOPLE)
    city = rng.choice(w.CITIES)[0]
    day = rng.choice(w.WEEKDAYS)
    frame = rng.randrange(4)
    if frame == 0:
        shop, years, hires = rng.choice(_SHOPS), rng.randrange(2, 30), rng.randrange(2, 9)
        facts = [
            f"{p.en} has lived in {city} for {years} years.",
            f"On {day}, {p.subj} opened a new {shop} in the city centre.",
            f"{p.subj.capitalize()} plans to hire {hires} people next month.",
        ]
        summary = f"{p.en} opened a new {shop} in {city} and plans to hire {hires} people."
        key = shop
    elif frame == 1:
        prof = rng.choice(w.PROFESSIONS)
        prize = rng.choice(("a national prize", "a city award", "a gold medal"))
        facts = [
            f"{p.en} is {_a(prof)} from {city}.",
            f"On {day}, {p.subj} won {prize} for {p.poss} work.",
            f"{p.subj.capitalize()} said the prize would help {p.obj} do more.",
        ]
        summary = f"{p.en}, {_a(prof)} from {city}, won {prize} on {day}."
        key = prof
    elif frame == 2:
        company = rng.choice(w.COMPANIES)
        amount = rng.randrange(2, 90) * 1000
        facts = [
            f"{company} is a company based in {city}.",
            f"On {day}, {company} gave {amount} dollars to the school where {p.en} teaches.",
            f"{p.en} will use the money to buy new computers for the students.",
        ]
        summary = f"{company} gave {amount} dollars to {p.en}'s school in {city} for computers."
        key = company
    else:
        animal = rng.choice(("cat", "dog", "parrot", "rabbit", "goat"))
        place = rng.choice(("up a tree", "in the river", "in an old well", "on a rooftop"))
        facts = [
            f"On {day}, a {animal} got stuck {place} in {city}.",
            f"{p.en}, who lives nearby, heard it and called for help.",
            f"After an hour, the {animal} was safe and unhurt.",
        ]
        summary = f"{p.en} helped rescue a {animal} stuck {place} in {city}."
        key = animal
    fillers = rng.sample(_FILLERS, rng.randrange(1, 3))
    sentences = facts[:]
    for f in fillers:  # distractors go anywhere after the first sentence
        sentences.insert(rng.randrange(1, len(sentences) + 1), f)
    return Sample({"text": " ".join(sentences)}, summary, f"{frame}|{key}|{city}")


# ---------------------------------------------------------------- translation


def translation_en_zh(rng: random.Random) -> Sample:
    t = sample_translation(rng)
    return Sample({"text": t.english}, t.chinese, t.combo)


# ---------------------------------------------------------------- text to SQL


@cache
def _sql_facts() -> dict[str, object]:
    con = sqlite3.connect(":memory:")
    con.executescript(w.sql_setup())
    q = lambda s: con.execute(s).fetchall()
    facts = {
        "max_age": q("SELECT MAX(age) FROM employees")[0][0],
        "max_salary_by_city": dict(q("SELECT city, MAX(salary) FROM employees GROUP BY city")),
        "min_price_by_cat": dict(q("SELECT category, MIN(price) FROM products GROUP BY category")),
        "pairs": sorted(set(q("SELECT customer, product FROM orders"))),
        "order_cities": sorted(r[0] for r in q("SELECT DISTINCT city FROM orders")),
        "cities": sorted(r[0] for r in q("SELECT DISTINCT city FROM employees")),
        "city_dept": sorted(set(q("SELECT city, department FROM employees"))),
        "max_age_by_dept": dict(
            q("SELECT department, MAX(age) FROM employees GROUP BY department")
        ),
        "max_price": q("SELECT MAX(price) FROM products")[0][0],
        "min_age": q("SELECT MIN(age) FROM employees")[0][0],
    }
    con.close()
    return facts


# Query kinds over the employees table; the others ask about products and orders.
_EMPLOYEE_KINDS = frozenset((0, 1, 2, 3, 4, 5, 8, 11, 13))


def text_to_sql(rng: random.Random) -> Sample:
    f = _sql_facts()
    kind = rng.randrange(14)
    # Drawn for every kind, used or not: the sequence of draws fixes the
    # bundled dataset, so it stays as it was when the dataset was published.
    dept = rng.choice(w.DEPARTMENTS)
    city = rng.choice(f["cities"])
    if kind in _EMPLOYEE_KINDS:
        req, sql, key = _employee_query(rng, f, kind, dept, city)
    else:
        req, sql, key = _product_or_order_query(rng, f, kind)
    return Sample({"text": req}, sql, f"sql{kind}|{key}", {"code_kind": "sql"})


def _employee_query(
    rng: random.Random, f: dict[str, object], kind: int, dept: str, city: str
) -> tuple[str, str, str]:
    """(request, SQL, combo key) of an employees-table query kind."""
    if kind == 0:
        req = f"List the names of employees in the {dept} department."
        sql = f"SELECT name FROM employees WHERE department = '{dept}' ORDER BY name;"
        key = dept
    elif kind == 1:
        req = f"How many employees work in {city}?"
        sql = f"SELECT COUNT(*) FROM employees WHERE city = '{city}';"
        key = city
    elif kind == 2:
        req = f"What is the average salary in the {dept} department?"
        sql = f"SELECT AVG(salary) FROM employees WHERE department = '{dept}';"
        key = dept
    elif kind == 3:
        age = rng.randrange(25, f["max_age"])
        req = f"Show the names of employees older than {age}."
        sql = f"SELECT name FROM employees WHERE age > {age} ORDER BY name;"
        key = str(age)
    elif kind == 4:
        limit = f["max_salary_by_city"][city] // 1000
        amount = rng.randrange(30, limit) * 1000 if limit > 30 else 0
        req = f"Which employees in {city} earn more than {amount} dollars?"
        sql = (
            f"SELECT name FROM employees WHERE city = '{city}' AND salary > {amount} ORDER BY name;"
        )
        key = f"{city}|{amount}"
    elif kind == 5:
        req = f"What is the highest salary in the {dept} department?"
        sql = f"SELECT MAX(salary) FROM employees WHERE department = '{dept}';"
        key = dept
    elif kind == 8:
        city, dept = rng.choice(f["city_dept"])
        req = f"List the employees in {city} who work in {dept}."
        sql = (
            f"SELECT name FROM employees WHERE city = '{city}' AND department = '{dept}' "
            "ORDER BY name;"
        )
        key = f"{city}|{dept}"
    elif kind == 11:
        age = rng.randrange(22, f["max_age_by_dept"][dept])
        req = f"List the employees in {dept} who are older than {age}."
        sql = (
            f"SELECT name FROM employees WHERE department = '{dept}' AND age > {age} ORDER BY name;"
        )
        key = f"{dept}|{age}"
    else:  # kind 13
        age = rng.randrange(f["min_age"] + 1, 66)
        req = f"Show the names of employees younger than {age}."
        sql = f"SELECT name FROM employees WHERE age < {age} ORDER BY name;"
        key = str(age)
    return req, sql, key


def _product_or_order_query(
    rng: random.Random, f: dict[str, object], kind: int
) -> tuple[str, str, str]:
    """(request, SQL, combo key) of a products- or orders-table query kind."""
    if kind == 6:
        cat = rng.choice(sorted(w.PRODUCT_CATEGORIES))
        price = f["min_price_by_cat"][cat] + rng.randrange(1, 120)
        req = f"List the {cat} products that cost less than {price} dollars."
        sql = (
            f"SELECT name FROM products WHERE category = '{cat}' AND price < {price} ORDER BY name;"
        )
        key = f"{cat}|{price}"
    elif kind == 7:
        customer, product = rng.choice(f["pairs"])
        req = f"How many units of {product} did {customer} order in total?"
        sql = (
            f"SELECT SUM(quantity) FROM orders WHERE customer = '{customer}' "
            f"AND product = '{product}';"
        )
        key = f"{customer}|{product}"
    elif kind == 9:
        city = rng.choice(f["order_cities"])
        req = f"How many orders came from {city}?"
        sql = f"SELECT COUNT(*) FROM orders WHERE city = '{city}';"
        key = city
    elif kind == 12:
        price = rng.randrange(3, f["max_price"])
        req = f"How many products cost more than {price} dollars?"
        sql = f"SELECT COUNT(*) FROM products WHERE price > {price};"
        key = str(price)
    else:  # kind 10
        product = rng.choice(f["pairs"])[1]
        req = f"Which customers ordered a {product}?"
        sql = f"SELECT DISTINCT customer FROM orders WHERE product = '{product}' ORDER BY customer;"
        key = product
    return req, sql, key


# ---------------------------------------------------------------- arithmetic

_ITEMS = ("apples", "pencils", "tickets", "books", "eggs", "stamps", "cookies", "marbles")


def _num(rng: random.Random, n: int) -> str:
    # Small numbers sometimes appear as words, so the model learns both forms.
    return w.NUMBER_WORDS[n] if n < len(w.NUMBER_WORDS) and rng.random() < 0.3 else str(n)


def text_to_arithmetic(rng: random.Random) -> Sample:
    kind = rng.randrange(7)
    a, b, c = rng.randrange(2, 60), rng.randrange(2, 40), rng.randrange(2, 10)
    p = rng.choice(w.PEOPLE)
    item = rng.choice(_ITEMS)
    if kind == 0:
        req, expr = f"Add {_num(rng, a)} and {_num(rng, b)}.", f"{a} + {b}"
    elif kind == 1:
        req, expr = f"What is {_num(rng, a)} times {_num(rng, c)}?", f"{a} * {c}"
    elif kind == 2:
        a, b = max(a, b), min(a, b)
        req, expr = f"Subtract {_num(rng, b)} from {_num(rng, a)}.", f"{a} - {b}"
    elif kind == 3:
        req = f"Add {_num(rng, a)} and {_num(rng, b)}, then multiply by {_num(rng, c)}."
        expr = f"({a} + {b}) * {c}"
    elif kind == 4:
        price = rng.randrange(1, 10)
        bill = rng.choice((20, 50, 100))
        count = rng.randrange(1, bill // price + 1)
        count = min(count, 12)
        req = (
            f"{p.en} buys {_num(rng, count)} {item} at {price} dollars each and pays "
            f"with {bill} dollars. How much change does {p.subj} get?"
        )
        expr = f"{bill} - {count} * {price}"
    elif kind == 5:
        a, b = max(a, b), min(a, b)
        req = f"{p.en} has {a} {item} and gives {_num(rng, b)} away. How many are left?"
        expr = f"{a} - {b}"
    else:
        per = rng.randrange(2, 12)
        req = (
            f"{p.en} shares {per * c} {item} equally among {_num(rng, c)} friends. "
            "How many does each friend get?"
        )
        expr = f"{per * c} / {c}"
    return Sample({"text": req}, expr, f"arith{kind}|{expr}", {"code_kind": "arithmetic"})


# ---------------------------------------------------------------- extraction


def _date(rng: random.Random) -> str:
    return f"{rng.choice(w.MONTHS)} {rng.randrange(1, 29)}, {rng.randrange(2015, 2025)}"


def extraction(rng: random.Random) -> Sample:
    p = rng.choice(w.PEOPLE)
    company = rng.choice(w.COMPANIES)
    city = rng.choice(w.CITIES)[0]
    date = _date(rng)
    amount = f"${rng.randrange(10, 5000)}"
    kind = rng.randrange(4)
    values = {"name": p.en, "company": company, "date": date, "amount": amount, "city": city}
    texts = (
        f"On {date}, {p.en} paid {amount} to {company} in {city}.",
        f"{p.en} signed a contract with {company} on {date}; the fee was {amount}.",
        f"The invoice from {company} to {p.en}, dated {date}, was for {amount}.",
        f"{company} hired {p.en} in {city} on {date} with a bonus of {amount}.",
    )
    text = texts[kind]
    present = [k for k, v in values.items() if v in text]
    key = rng.choice(present)
    questions = {
        "name": "the person's name",
        "company": "the company name",
        "date": "the date",
        "amount": "the amount of money",
        "city": "the city",
    }
    return Sample(
        {"text": text, "field": questions[key]}, values[key], f"ext{kind}|{key}|{company}"
    )


# ---------------------------------------------------------------- question answering

_PETS = ("cats", "dogs", "rabbits", "birds", "fish")


def qa(rng: random.Random) -> Sample:
    a, b = rng.sample(w.PEOPLE, 2)
    ca, cb = rng.sample(w.CITIES, 2)
    ja, jb = rng.sample(w.PROFESSIONS, 2)
    pets, n = rng.choice(_PETS), rng.randrange(2, 7)
    coa = rng.choice(w.COMPANIES)
    context = (
        f"{a.en} lives in {ca[0]} and works as {_a(ja)} at {coa}. "
        f"{a.subj.capitalize()} has {n} {pets}. "
        f"{a.poss.capitalize()} friend {b.en} is {_a(jb)} in {cb[0]}."
    )
    kind = rng.randrange(6)
    qs = (
        (f"Where does {a.en} live?", ca[0]),
        (f"What is {a.en}'s job?", ja),
        (f"How many {pets} does {a.en} have?", str(n)),
        (f"Where does {a.en} work?", coa),
        (f"Who is {a.en}'s friend?", b.en),
        (f"In which city is {b.en}?", cb[0]),
    )
    question, answer = qs[kind]
    return Sample({"context": context, "question": question}, answer, f"qa{kind}|{a.en}|{ca[0]}")


# ---------------------------------------------------------------- topic writing


def topic_writing(rng: random.Random) -> Sample:
    topic = rng.choice(sorted(TOPICS))
    opening, facts = TOPICS[topic]
    # The keyword order is the sentence order, so the prompt fixes the reference.
    chosen = rng.sample(range(len(facts)), rng.choice((2, 3)))
    keywords = [facts[i][0] for i in chosen]
    paragraph = " ".join([opening] + [facts[i][1] for i in chosen])
    return Sample(
        {"topic": topic, "keywords": ", ".join(keywords[:-1]) + " and " + keywords[-1]},
        paragraph,
        f"{topic}|{''.join(map(str, chosen))}",
    )


@dataclass(frozen=True)
class TaskSpec:
    name: str
    generate: Callable[[random.Random], Sample]
    metric: str
    description: str


TASK_SPECS: dict[str, TaskSpec] = {
    s.name: s
    for s in (
        TaskSpec("sentiment", sentiment, "classification", "label a sentence's sentiment"),
        TaskSpec("summarization", summarization, "rouge", "one-sentence summary of a passage"),
        TaskSpec("translation_en_zh", translation_en_zh, "bleu_zh", "English to Chinese"),
        TaskSpec("text_to_sql", text_to_sql, "execution_sql", "English request to SQL"),
        TaskSpec(
            "text_to_arithmetic",
            text_to_arithmetic,
            "execution_arithmetic",
            "word problem to an arithmetic expression",
        ),
        TaskSpec("extraction", extraction, "exact_match", "extract a name/date/amount"),
        TaskSpec("qa", qa, "exact_match", "answer a question about a short context"),
        TaskSpec("topic_writing", topic_writing, "rouge", "short paragraph on a topic"),
    )
}
