"""How different are a segment's best-sellers from the store's? For each segment of shoppers who
share the users file's attributes (all of them, then the first alone), the share of its ten
best-selling items that are among the store's ten, weighted by the segment's shoppers; segments of
at least --min-users shoppers. Descriptive, over every event of the data set.

    python scripts/segment_overlap.py ../shared/data/ta-feng --attributes age_group,region
"""

import argparse
import csv
from collections import Counter, defaultdict
from pathlib import Path


def overlaps(data: Path, attributes: list[str], min_users: int) -> tuple[int, int, float]:
    with open(data / "users.csv", newline="") as f:
        segment_of = {r["user_id"]: tuple(r[a] for a in attributes) for r in csv.DictReader(f)}
    store, sold, members = Counter(), defaultdict(Counter), defaultdict(set)
    with open(data / "interactions.csv", newline="") as f:
        for row in csv.DictReader(f):
            segment = segment_of.get(row["user_id"])
            store[row["item_id"]] += 1
            if segment and all(segment):  # a shopper with an unknown attribute is in no segment
                sold[segment][row["item_id"]] += 1
                members[segment].add(row["user_id"])
    top = {item for item, _ in store.most_common(10)}
    kept = [s for s in sold if len(members[s]) >= min_users]
    shoppers = sum(len(members[s]) for s in kept)
    shared = sum(len({i for i, _ in sold[s].most_common(10)} & top) / 10 * len(members[s]) for s in kept)
    return len(kept), shoppers, shared / shoppers if shoppers else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="folder with users.csv and interactions.csv")
    parser.add_argument("--attributes", default="age_group,region")
    parser.add_argument("--min-users", type=int, default=30)
    args = parser.parse_args()
    names = args.attributes.split(",")
    for attributes in (names, names[:1]):
        segments, shoppers, share = overlaps(args.data, attributes, args.min_users)
        print(f"{'+'.join(attributes)}: {segments} segments, {shoppers} shoppers; of a segment's top 10, "
              f"{share:.3f} are in the store's top 10 (shopper-weighted)")


if __name__ == "__main__":
    main()
