"""Write a seeded random sample of a data set's users (their events and the products they touch) as
items.csv + interactions.csv (+ users.csv, their attributes, where the data set has one), for
benchmarks and demonstrations on a store of a chosen size.

    python scripts/sample_logs.py ../shared/data/amazon-beauty out/beauty-1200 --users 1200
"""

import argparse
import csv
import random
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="folder with items.csv and interactions.csv")
    parser.add_argument("out", type=Path)
    parser.add_argument("--users", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with open(args.data / "interactions.csv", newline="") as f:
        reader = csv.DictReader(f)
        events, header = list(reader), reader.fieldnames
    users = sorted({e["user_id"] for e in events})
    picked = set(random.Random(args.seed).sample(users, min(args.users, len(users))))
    kept = [e for e in events if e["user_id"] in picked]
    items = {e["item_id"] for e in kept}
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "interactions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, header)
        writer.writeheader()
        writer.writerows(kept)
    with open(args.data / "items.csv", newline="") as f, open(args.out / "items.csv", "w", newline="") as out:
        reader = csv.DictReader(f)
        writer = csv.DictWriter(out, reader.fieldnames)
        writer.writeheader()
        writer.writerows(row for row in reader if row["item_id"] in items)
    if (args.data / "users.csv").exists():
        with open(args.data / "users.csv", newline="") as f, open(args.out / "users.csv", "w", newline="") as out:
            reader = csv.DictReader(f)
            writer = csv.DictWriter(out, reader.fieldnames)
            writer.writeheader()
            writer.writerows(row for row in reader if row["user_id"] in picked)
    print(f"{len(picked)} users, {len(kept)} events, {len(items)} products -> {args.out}")


if __name__ == "__main__":
    main()
