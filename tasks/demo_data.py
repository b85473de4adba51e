"""A small, deterministic product-extraction data set: HTML snippet in, JSON object out.

The layout varies (field order, labels, noise elements) so that a model has to read each snippet rather
than memorise a template, and eval products never appear in train, so eval scores measure extraction.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ADJECTIVES = [
    "Compact", "Deluxe", "Classic", "Ultra", "Smart", "Portable", "Premium", "Eco", "Mini", "Pro",
    "Vintage", "Rugged", "Silent", "Wireless", "Foldable", "Turbo", "Slim", "Heavy-Duty", "Nordic", "Urban",
]  # fmt: skip

# Nouns grouped by the category they are listed under, so the category is plausible for the name.
NOUNS_BY_CATEGORY = {
    "Electronics": ["Laptop", "Headphones", "Speaker", "Monitor", "Tablet", "Camera", "Router", "Keyboard"],
    "Kitchen": ["Blender", "Kettle", "Toaster", "Skillet", "Coffee Maker", "Knife Set", "Mixer"],
    "Outdoors": ["Tent", "Backpack", "Lantern", "Sleeping Bag", "Hiking Pole", "Cooler"],
    "Home": ["Lamp", "Rug", "Bookshelf", "Armchair", "Curtain", "Clock"],
    "Sports": ["Yoga Mat", "Dumbbell", "Bicycle", "Tennis Racket", "Jump Rope", "Helmet"],
    "Toys": ["Puzzle", "Robot Kit", "Kite", "Building Blocks", "Board Game"],
}

MANUFACTURERS = [
    "Acme", "Globex", "Initech", "Umbrella", "Stark", "Wayne", "Hooli", "Vandelay", "Soylent", "Tyrell",
    "Cyberdyne", "Wonka", "Gringotts", "Oscorp", "Aperture", "Nakatomi",
]  # fmt: skip

HEADINGS = ["<h2>Product: {name}</h2>", "<h2>{name}</h2>", "<h3>Item: {name}</h3>", "<h1>{name}</h1>"]
PRICE_LABELS = ["Price", "Cost", "Our price"]
CATEGORY_LABELS = ["Category", "Department", "Type"]
MANUFACTURER_LABELS = ["Brand", "Manufacturer", "Made by"]
# Distractors the model must learn to ignore: none of these belong in the output.
NOISE = [
    "<span>In stock</span>",
    "<span>Free shipping</span>",
    "<p>Rating: {rating}/5</p>",
    "<p>SKU: {sku}</p>",
    "<span>Only {stock} left</span>",
    "<p>Ships in {days} days</p>",
]


def _product_catalogue() -> list[tuple[str, str]]:
    """Every (name, category) pair, in a fixed order."""
    return [
        (f"{adjective} {noun}", category)
        for category, nouns in NOUNS_BY_CATEGORY.items()
        for noun in nouns
        for adjective in ADJECTIVES
    ]


def _price(rng: random.Random) -> str:
    dollars = rng.choice([rng.randint(5, 99), rng.randint(100, 2500)])
    return f"${dollars}" if rng.random() < 0.5 else f"${dollars}.{rng.choice([49, 95, 99])}"


def _row(rng: random.Random, name: str, category: str) -> dict[str, object]:
    price = _price(rng)
    manufacturer = rng.choice(MANUFACTURERS)
    fields = [
        f"<p>{rng.choice(PRICE_LABELS)}: {price}</p>",
        f"<p>{rng.choice(CATEGORY_LABELS)}: {category}</p>",
        f"<p>{rng.choice(MANUFACTURER_LABELS)}: {manufacturer}</p>",
    ]
    rng.shuffle(fields)
    for template in rng.sample(NOISE, rng.randint(1, 2)):
        noise = template.format(
            rating=f"{rng.randint(30, 50) / 10:.1f}",
            sku=f"{rng.choice('ABCDEFGHJK')}{rng.choice('LMNPQRSTUV')}-{rng.randint(1000, 9999)}",
            stock=rng.randint(2, 9),
            days=rng.randint(1, 7),
        )
        fields.insert(rng.randint(0, len(fields)), noise)
    heading = rng.choice(HEADINGS).format(name=name)
    return {
        "input": f'<div class="product">{heading}{"".join(fields)}</div>',
        "output": {"name": name, "price": price, "category": category, "manufacturer": manufacturer},
    }


def _write_jsonl(path: Path, rows: list[dict[str, object]]) -> None:
    # newline="\n" so the bytes are identical on every platform.
    with path.open("w", encoding="utf-8", newline="\n") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_demo_dataset(out_dir: Path, n_train: int = 400, n_eval: int = 48, seed: int = 0) -> tuple[Path, Path]:
    """Write `train.jsonl` and `eval.jsonl` under `out_dir`; the same arguments always give the same bytes."""
    catalogue = _product_catalogue()
    if n_train < 1 or n_eval < 1 or n_train + n_eval > len(catalogue):
        raise ValueError(
            f"n_train={n_train}, n_eval={n_eval}: each must be >= 1 and together at most {len(catalogue)} "
            "(the number of distinct products)"
        )
    rng = random.Random(seed)
    # Sampling without replacement makes every product distinct, so eval products never occur in train.
    products = rng.sample(catalogue, n_train + n_eval)
    rows = [_row(rng, name, category) for name, category in products]
    out_dir.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    _write_jsonl(train_path, rows[:n_train])
    _write_jsonl(eval_path, rows[n_train:])
    return train_path, eval_path


def write_demo_rag_log(db_path: Path, n: int = 60, seed: int = 1) -> Path:
    """Append `n` examples "logged by a RAG assistant" to the SQLite table `rag_examples` at `db_path`.

    Products come from outside the demo's train and eval sets; ratings (1-5, some unrated) and timestamps are
    seeded, so the retrain flow's demo and tests have realistic traffic to ingest. Each call adds new rows,
    like another day of traffic.
    """
    import datetime as dt
    import sqlite3

    catalogue = _product_catalogue()
    used = set(random.Random(0).sample(catalogue, 448))  # what write_demo_dataset's defaults use
    unused = [product for product in catalogue if product not in used]
    random.Random(seed).shuffle(unused)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(db_path) as db:
        db.execute("create table if not exists rag_examples (id integer primary key autoincrement, question text "
                   "not null, context text, answer text not null, rating integer, created_at text not null)")
        start = db.execute("select count(*) from rag_examples").fetchone()[0]
        rng = random.Random(f"{seed}:{start}")  # another call, another day: new values
        rows = []
        for i in range(n):
            row = _row(rng, *unused[(start + i) % len(unused)])
            created = dt.datetime(2026, 11, 1) + dt.timedelta(minutes=17 * (start + i))
            rating = rng.choice([None, 2, 4, 5, 5])
            rows.append((row["input"], None, json.dumps(row["output"]), rating, created.isoformat()))
        db.executemany("insert into rag_examples (question, context, answer, rating, created_at) "
                       "values (?, ?, ?, ?, ?)", rows)
    return db_path
