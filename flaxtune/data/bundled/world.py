"""The small fixed world that every bundled task talks about.

People, cities, companies, products and a tiny SQL database. The lexicons
are fixed (they are the world); the seed only changes which combinations an
example draws. Names carry their Chinese forms so that the en→zh translation
task can use them, and the SQL tables are built from a fixed RNG so that
:func:`sql_setup` is a constant string and a generated SQL reference can be
executed by anyone with ``sqlite3``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Person:
    en: str
    zh: str
    female: bool

    @property
    def subj(self) -> str:
        return "she" if self.female else "he"

    @property
    def poss(self) -> str:
        return "her" if self.female else "his"

    @property
    def obj(self) -> str:
        return "her" if self.female else "him"


PEOPLE = (
    Person("Anna", "安娜", True),
    Person("Tom", "汤姆", False),
    Person("Maria", "玛丽亚", True),
    Person("David", "大卫", False),
    Person("Lucy", "露西", True),
    Person("Peter", "彼得", False),
    Person("Emma", "艾玛", True),
    Person("Jack", "杰克", False),
    Person("Sophie", "索菲", True),
    Person("Daniel", "丹尼尔", False),
    Person("Lily", "莉莉", True),
    Person("Michael", "迈克尔", False),
    Person("Grace", "格蕾丝", True),
    Person("Sam", "萨姆", False),
    Person("Olivia", "奥利维亚", True),
    Person("Henry", "亨利", False),
    Person("Chloe", "克洛伊", True),
    Person("Leo", "利奥", False),
    Person("Nina", "妮娜", True),
    Person("Oscar", "奥斯卡", False),
    Person("Alice", "爱丽丝", True),
    Person("Bruno", "布鲁诺", False),
    Person("Clara", "克拉拉", True),
    Person("Victor", "维克多", False),
    Person("Julia", "朱莉娅", True),
    Person("Adam", "亚当", False),
    Person("Rosa", "罗莎", True),
    Person("Ivan", "伊万", False),
    Person("Helen", "海伦", True),
    Person("Mark", "马克", False),
    Person("Laura", "劳拉", True),
    Person("Paul", "保罗", False),
)

CITIES = (
    ("Paris", "巴黎"),
    ("London", "伦敦"),
    ("Beijing", "北京"),
    ("Shanghai", "上海"),
    ("Tokyo", "东京"),
    ("Berlin", "柏林"),
    ("Madrid", "马德里"),
    ("Rome", "罗马"),
    ("Cairo", "开罗"),
    ("Sydney", "悉尼"),
    ("Toronto", "多伦多"),
    ("Chicago", "芝加哥"),
    ("Boston", "波士顿"),
    ("Seoul", "首尔"),
    ("Vienna", "维也纳"),
    ("Lisbon", "里斯本"),
    ("Dublin", "都柏林"),
    ("Oslo", "奥斯陆"),
)

COMPANIES = (
    "Acme",
    "Globex",
    "Initech",
    "Umbrella Foods",
    "Northwind",
    "Blue River",
    "Sunrise Bank",
    "Green Leaf",
    "Silver Line",
    "Red Rock Tools",
    "Bright Books",
    "Oak Furniture",
    "Delta Travel",
    "Pixel Labs",
)

PROFESSIONS = (
    "teacher",
    "doctor",
    "nurse",
    "engineer",
    "baker",
    "farmer",
    "lawyer",
    "painter",
    "pilot",
    "chef",
    "writer",
    "driver",
    "librarian",
    "photographer",
    "gardener",
    "musician",
)

WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
NUMBER_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
)
COLORS = ("red", "blue", "green", "black", "white", "yellow", "grey", "brown")

# ----------------------------------------------------------------------- SQL

DEPARTMENTS = ("Sales", "Marketing", "Engineering", "Finance", "Support", "Legal", "Design")
PRODUCT_CATEGORIES = {
    "office": ("stapler", "notebook", "pen", "desk lamp", "folder", "printer paper"),
    "kitchen": ("kettle", "frying pan", "coffee mug", "toaster", "cutting board"),
    "garden": ("shovel", "watering can", "flower pot", "garden hose", "rake"),
    "electronics": ("headphones", "keyboard", "mouse", "monitor", "charger", "webcam"),
}
_SQL_SEED = 20240611


@dataclass(frozen=True)
class SqlWorld:
    employees: tuple[tuple[int, str, str, str, int, int], ...]  # id,name,dept,city,salary,age
    products: tuple[tuple[int, str, str, int], ...]  # id,name,category,price
    orders: tuple[tuple[int, str, str, int, str], ...]  # id,customer,product,quantity,city


def _build_sql_world() -> SqlWorld:
    rng = random.Random(_SQL_SEED)
    employees = []
    cities = [c for c, _ in CITIES[:10]]
    # Every (department) and every city appears at least once: cycle first.
    for i in range(70):
        dept = DEPARTMENTS[i % len(DEPARTMENTS)]
        city = cities[i % len(cities)]
        name = f"{PEOPLE[i % len(PEOPLE)].en} {_SURNAMES[i % len(_SURNAMES)]}"
        salary = rng.randrange(30, 150) * 1000
        age = rng.randrange(22, 65)
        employees.append((i + 1, name, dept, city, salary, age))
    products = []
    pid = 1
    for category, names in PRODUCT_CATEGORIES.items():
        for name in names:
            products.append((pid, name, category, rng.randrange(3, 250)))
            pid += 1
    orders = []
    customers = [p.en for p in PEOPLE[:20]]
    for i in range(160):
        orders.append(
            (
                i + 1,
                customers[rng.randrange(len(customers))],
                products[rng.randrange(len(products))][1],
                rng.randrange(1, 10),
                cities[rng.randrange(len(cities))],
            )
        )
    return SqlWorld(tuple(employees), tuple(products), tuple(orders))


_SURNAMES = (
    "Smith",
    "Chen",
    "Garcia",
    "Brown",
    "Wang",
    "Miller",
    "Kim",
    "Novak",
    "Rossi",
    "Lopez",
    "Meyer",
    "Tanaka",
    "Silva",
)

SQL_WORLD = _build_sql_world()


def _quote(value: str | int) -> str:
    if isinstance(value, int):
        return str(value)
    return "'" + value.replace("'", "''") + "'"


def sql_setup() -> str:
    """CREATE TABLE and INSERT statements (sqlite3) for the bundled SQL world.

    Every SQL reference of the ``text_to_sql`` task executes on this database
    to a non-empty result; use ``sqlite3.connect(":memory:").executescript``.
    """
    lines = [
        "CREATE TABLE employees (id INTEGER PRIMARY KEY, name TEXT, department TEXT, "
        "city TEXT, salary INTEGER, age INTEGER);",
        "CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT, category TEXT, price INTEGER);",
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer TEXT, product TEXT, "
        "quantity INTEGER, city TEXT);",
    ]
    for table, rows in (
        ("employees", SQL_WORLD.employees),
        ("products", SQL_WORLD.products),
        ("orders", SQL_WORLD.orders),
    ):
        for row in rows:
            lines.append(f"INSERT INTO {table} VALUES ({', '.join(_quote(v) for v in row)});")
    return "\n".join(lines) + "\n"
