"""A small, deterministic product-extraction data set: HTML snippet in, JSON object out.

What a model must learn to score on the held-out pages, and why the pages look the way they do:
- Read, not recall. Eval product names never occur in train (names are split before anything is drawn),
  manufacturers come from a list too long to guess, and prices are random: only what the page says gets a
  field right. The untrained base model gets none.
- The same tokens on both sides. Every value sits right after `">` (schema.org microdata, `itemprop` naming
  the JSON key), so the tokenizer cuts it into the same tokens as in the compact JSON answer, where it
  follows `":"`. After a label and a space (`Brand: Hooli`) it would start with a different token
  (` H` against `H`), and a small model would have to learn a spelling map per value instead of a copy.
- Several layouts (paragraphs, a spec table, a definition list, a bullet list), labels, field orders and
  distractors (ratings, SKUs, stock notes), shared by train and eval, so position alone never tells.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ADJECTIVES = [
    "Compact", "Deluxe", "Classic", "Ultra", "Smart", "Portable", "Premium", "Eco", "Mini", "Pro",
    "Vintage", "Rugged", "Silent", "Wireless", "Foldable", "Turbo", "Slim", "Heavy-Duty", "Nordic", "Urban",
    "Solar", "Arctic", "Royal", "Golden", "Swift", "Bold", "Quiet", "Bright", "Rapid", "Grand",
    "Little", "Mega", "Prime", "Pure", "Retro", "Sonic", "Alpine", "Coastal", "Modern", "Rustic",
    "Velvet", "Crystal", "Iron", "Cosmic",
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
    "Cyberdyne", "Wonka", "Gringotts", "Oscorp", "Aperture", "Nakatomi", "Zenith", "Orbit", "Falcon", "Summit",
    "Harbor", "Beacon", "Vertex", "Nimbus", "Apex", "Cobalt", "Quasar", "Meridian", "Pioneer", "Atlas",
    "Titan", "Nova", "Lumen", "Polar", "Crest", "Ember", "Onyx", "Sable", "Willow", "Birch",
    "Cedar", "Maple", "Aspen", "Juniper", "Osprey", "Kestrel", "Heron", "Lynx", "Otter", "Badger",
    "Raven", "Sterling", "Monarch", "Regal", "Vista", "Horizon", "Canyon", "Glacier", "Tundra", "Sierra",
    "Mesa", "Delta",
]  # fmt: skip

# `tunepipe demo`'s data set (train, test rows): more distinct pages than its training reads, none twice, so
# the small model learns to read pages rather than remember them (shared/notes/tiny-models-learn.md: 400 pages
# were memorised); the tests' smaller default is enough for a few steps. As many test pages as configs/demo.yaml
# scores (eval.max_samples): its eval loss then covers the pages the gate decides on, and no more.
DEMO_ROWS = (4000, 16)

FIELDS = ("price", "category", "manufacturer")  # after the name, in the answer's key order
LABELS = {
    "price": ["Price", "Cost", "Our price"],
    "category": ["Category", "Department", "Type"],
    "manufacturer": ["Brand", "Manufacturer", "Made by"],
}
# Distractors the model must learn to ignore: none of these belong in the output.
NOISE = ["In stock", "Free shipping", "Rating: {rating}/5", "SKU: {sku}", "Only {stock} left", "Ships in {days} days"]


def _names() -> list[tuple[str, str]]:
    """Every (name, category) pair, in a fixed order."""
    return [
        (f"{adjective} {noun}", category)
        for category, nouns in NOUNS_BY_CATEGORY.items()
        for noun in nouns
        for adjective in ADJECTIVES
    ]


def _price(rng: random.Random) -> str:
    dollars = rng.choice([rng.randint(5, 99), rng.randint(100, 2500)])
    return f"${dollars}" if rng.random() < 0.5 else f"${dollars}.{rng.randint(0, 99):02d}"


def _page(rng: random.Random, name: str, values: dict[str, str], notes: list[str]) -> str:
    """One of four layouts; each value directly after `">` in an element whose itemprop is its key."""
    labelled = [(rng.choice(LABELS[key]), key, values[key]) for key in FIELDS]
    layout = rng.randrange(4)
    if layout == 0:
        parts = [f'<p>{label}: <span itemprop="{key}">{value}</span></p>' for label, key, value in labelled]
        parts += [f"<p>{note}</p>" for note in notes]
        rng.shuffle(parts)
        return f'<div itemscope><h2 itemprop="name">{name}</h2>{"".join(parts)}</div>'
    if layout == 1:
        parts = [f'<tr><th>{label}</th><td itemprop="{key}">{value}</td></tr>' for label, key, value in labelled]
        parts += [f"<tr><td>{note}</td></tr>" for note in notes]
        rng.shuffle(parts)
        return f'<table itemscope><caption itemprop="name">{name}</caption>{"".join(parts)}</table>'
    if layout == 2:
        parts = [f'<dt>{label}</dt><dd itemprop="{key}">{value}</dd>' for label, key, value in labelled]
        rng.shuffle(parts)
        spans = "".join(f"<span>{note}</span>" for note in notes)
        return f'<section itemscope><h3 itemprop="name">{name}</h3>{spans}<dl>{"".join(parts)}</dl></section>'
    parts = [f'<li>{label}: <b itemprop="{key}">{value}</b></li>' for label, key, value in labelled]
    parts += [f"<li>{note}</li>" for note in notes]
    rng.shuffle(parts)
    return f'<ul itemscope><li itemprop="name">{name}</li>{"".join(parts)}</ul>'


def _row(rng: random.Random, name: str, category: str, manufacturer: str) -> dict[str, object]:
    values = {"price": _price(rng), "category": category, "manufacturer": manufacturer}
    notes = [
        template.format(
            rating=f"{rng.randint(30, 50) / 10:.1f}",
            sku=f"{rng.choice('ABCDEFGHJK')}{rng.choice('LMNPQRSTUV')}-{rng.randint(1000, 9999)}",
            stock=rng.randint(2, 9),
            days=rng.randint(1, 7),
        )
        for template in rng.sample(NOISE, rng.randint(1, 2))
    ]
    return {"input": _page(rng, name, values, notes), "output": {"name": name, **values}}


def _products(n_train: int, n_eval: int, seed: int) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """(train, eval) products (name, category, manufacturer): all distinct, and no eval name in train."""
    names = _names()
    n_train_names = len(names) - n_eval
    if n_train < 1 or n_eval < 1 or n_train_names < 1 or n_train > n_train_names * len(MANUFACTURERS):
        raise ValueError(
            f"n_train={n_train}, n_eval={n_eval}: each must be >= 1, n_eval below {len(names)} (the number of "
            f"product names) and n_train at most (names left for train) x {len(MANUFACTURERS)} manufacturers "
            "(the number of distinct products)"
        )
    rng = random.Random(seed)
    names = rng.sample(names, len(names))
    eval_products = [(*names[i], rng.choice(MANUFACTURERS)) for i in range(n_eval)]
    picks = rng.sample(range(n_train_names * len(MANUFACTURERS)), n_train)
    train_products = [(*names[n_eval + i // len(MANUFACTURERS)], MANUFACTURERS[i % len(MANUFACTURERS)]) for i in picks]
    return train_products, eval_products


def _write_jsonl(path: Path, rows: list[dict[str, object]]) -> None:
    # newline="\n" so the bytes are identical on every platform.
    with path.open("w", encoding="utf-8", newline="\n") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_demo_dataset(out_dir: Path, n_train: int = 400, n_eval: int = 48, seed: int = 0) -> tuple[Path, Path]:
    """Write `train.jsonl` and `eval.jsonl` under `out_dir`; the same arguments always give the same bytes."""
    train_products, eval_products = _products(n_train, n_eval, seed)
    rng = random.Random(f"{seed}:pages")
    out_dir.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    _write_jsonl(train_path, [_row(rng, *product) for product in train_products])
    _write_jsonl(eval_path, [_row(rng, *product) for product in eval_products])
    return train_path, eval_path


def bad_answer(rng: random.Random, page: str, product: dict[str, object]) -> str:
    """An answer users rate badly, as small models write them: wrong fields, the page's HTML echoed back, or
    rambling prose around the facts."""
    kind = rng.randrange(3)
    if kind == 0:  # a valid JSON object, but with fields that are wrong or missing
        wrong = dict(product)
        wrong["price"], wrong["manufacturer"] = wrong["manufacturer"], wrong["price"]
        wrong.pop(rng.choice(["category", "name"]))
        return json.dumps(wrong)
    if kind == 1:
        return page
    return (
        f"Sure! This looks like a {str(product['category']).lower()} product. I think it is called "
        f"{product['name']}, and it might be made by {product['manufacturer']}, although the page does not "
        f"say very clearly. The price seems to be around {product['price']}, but please check the page "
        "itself, as prices change often. Let me know if you need anything else!"
    )


def write_demo_rag_log(db_path: Path, n: int = 60, seed: int = 1) -> Path:
    """Append `n` examples "logged by a RAG assistant" to the SQLite table `rag_examples` at `db_path`.

    Products come from outside the demo's train and eval sets; ratings (1-5, some unrated) and timestamps are
    seeded, so the retrain flow's demo and tests have realistic traffic to ingest. Rows rated 2 hold bad
    answers (`bad_answer`); after half of them the user asked again and rated the right answer 5, so the log
    has questions with a good and a bad answer (DPO pairs). Each call adds new rows, like another
    day of traffic.
    """
    import datetime as dt
    import sqlite3

    used = set().union(*_products(*DEMO_ROWS, seed=0))  # what the demo's own data set uses
    names = _names()
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(db_path) as db:
        db.execute(
            "create table if not exists rag_examples (id integer primary key autoincrement, question text "
            "not null, context text, answer text not null, rating integer, created_at text not null)"
        )
        start = db.execute("select count(*) from rag_examples").fetchone()[0]
        rng = random.Random(f"{seed}:{start}")  # another call, another day: new values
        # Ratings from a stream of their own: how pages are drawn does not change which rows are rated well.
        ratings = random.Random(f"{seed}:{start}:rating")
        bad = random.Random(f"{seed}:{start}:bad")  # and the bad answers from a third: neither moves the others
        rows = []

        def log(question: str, answer: str, rating: int | None) -> None:
            created = dt.datetime(2026, 11, 1) + dt.timedelta(minutes=17 * (start + len(rows)))
            rows.append((question, None, answer, rating, created.isoformat()))

        while len(rows) < n:
            product = (*rng.choice(names), rng.choice(MANUFACTURERS))
            if product in used:
                continue
            row = _row(rng, *product)
            rating = ratings.choice([None, 2, 4, 5, 5])
            if rating == 2:
                log(row["input"], bad_answer(bad, row["input"], row["output"]), rating)
                if bad.random() < 0.5 and len(rows) < n:  # asked again, answered right
                    log(row["input"], json.dumps(row["output"]), 5)
            else:
                log(row["input"], json.dumps(row["output"]), rating)
        db.executemany(
            "insert into rag_examples (question, context, answer, rating, created_at) values (?, ?, ?, ?, ?)", rows
        )
    return db_path
