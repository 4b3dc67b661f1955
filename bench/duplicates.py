#!/usr/bin/env python
"""Choose ``DUPLICATE_THRESHOLD``: pair precision and recall of ``GET /duplicates`` on instance_small, through the API.

Indexes ``instance_small`` (skipping what the server has), builds the neighbour graph (``POST /jobs/neighbours``,
waits for it), then asks ``GET /duplicates`` at each ``--thresholds`` value and scores the pairs of images that share
a group against the ground truth below. Prints one JSON line per threshold.

Ground truth (from ``groups.csv``; the dataset's README describes each group), three kinds of pairs:

- **duplicate**: two files of the same photo with the same framing: exact copies, re-encodes (JPEG settings, PNG,
  WebP, AVIF, HEIF, TIFF...), colour-mode changes (grey, CMYK, palette, alpha), resizes and thumbnails, EXIF
  orientations (pixel-identical once applied), light edits (blur, sharpen, contrast, saturation, a local ELA edit);
- **either**: the same photo with a different geometry (rotations by 45/90/180/270 degrees, mirror images, square
  or portrait crops, a 128x128 face crop of a portrait): grouping them is not wrong, and not required; not scored;
- **different**: everything else, including separate shots of one scene (stereo pairs, consecutive video frames,
  viewpoint and lighting changes, the four desk photos, the chessboard series): these must stay apart.

Precision = duplicate pairs grouped / (duplicate + different pairs grouped); recall = duplicate pairs grouped / all
duplicate pairs. Pairs are counted within the returned groups (connected components), as a user sees them.

Usage: python bench/duplicates.py --api http://localhost:8000 [--thresholds 0.85,0.9,0.92,0.95]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: groups whose members are all duplicates of each other
WHOLE_GROUPS = {
    "exif_landscape",
    "exif_portrait",
    "ukbench09380",
    "jxl_wesaturate_cvo9xd",
    "jxl_wesaturate_tmshre",
    "gdk_bench_photo",
    "ocv_ela_edit",
}


def copy_key(group: str, variant: str) -> str | None | bool:
    """Which framing of which photo a file of ``groups.csv`` is: files with the same key are duplicates; ``None``:
    the same photo in another geometry ("either" with its group); ``False``: a separate shot (never a duplicate)."""
    if group in WHOLE_GROUPS or group.startswith("plasma_"):  # plasma: the wallpaper and its preview thumbnail
        return group
    if group == "pdq_bridge":
        return None if ("dihedral" in variant or "square" in variant) else group
    if group == "ianare_waterfall":
        return f"{group}:{variant.split()[0]}"  # landscape_crop or portrait_crop, each in 8 EXIF orientations
    if group == "ukbench00120":
        return group if variant in ("original", "resize", "grayscale") else None
    if group == "jxl_flower":
        if variant.startswith("flower.png"):
            return f"{group}:full"
        if variant.startswith("flower_small"):
            return f"{group}:small"
        return None
    if group == "grace_hopper":  # the 128x128 crop in every format and orientation; not the portrait, not hopper_45
        return None if ("hopper_45" in variant or "full" in variant) else group
    return False


def ground_truth(root: Path) -> tuple[dict[str, tuple[str, str | None | bool]], dict[str, str]]:
    """``({image id: (group, copy key)}, {image id: path})`` for instance_small at ``root``."""
    labels, paths = {}, {}
    with (root / "groups.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            image_id = hashlib.sha256((root / row["path"]).read_bytes()).hexdigest()
            labels[image_id] = (row["group"], copy_key(row["group"], row["variant"]))
            paths[image_id] = row["path"]
    return labels, paths


def pair_kind(a: tuple[str, str | None | bool], b: tuple[str, str | None | bool]) -> str:
    """``duplicate``, ``either`` or ``different`` for two files' ``(group, copy key)``."""
    (ga, ka), (gb, kb) = a, b
    if ga != gb or ka is False or kb is False:
        return "different"
    if ka is None or kb is None or ka != kb:
        return "either"
    return "duplicate"


def score_groups(groups: list[list[str]], labels: dict[str, tuple[str, str | None | bool]]) -> dict:
    """Pair precision/recall of ``groups`` (lists of image ids) against ``labels``."""
    kinds = {"duplicate": 0, "either": 0, "different": 0}
    for ids in groups:
        for a, b in itertools.combinations(ids, 2):
            kinds[pair_kind(labels[a], labels[b])] += 1
    all_dup = sum(pair_kind(labels[a], labels[b]) == "duplicate" for a, b in itertools.combinations(sorted(labels), 2))
    grouped = kinds["duplicate"] + kinds["different"]
    return {
        "precision": round(kinds["duplicate"] / grouped, 4) if grouped else 1.0,
        "recall": round(kinds["duplicate"] / all_dup, 4),
        "duplicate_pairs": kinds["duplicate"],
        "different_pairs": kinds["different"],
        "either_pairs": kinds["either"],
        "all_duplicate_pairs": all_dup,
    }


def wait_for_graph(client: httpx.Client, poll_s: float = 0.5) -> dict:
    """Start the neighbour-graph job and wait until it completes; returns the job."""
    job = client.post("/jobs/neighbours").raise_for_status().json()
    while job["state"] != "completed":
        if job["state"] in ("failed", "interrupted"):
            raise SystemExit(f"the neighbour-graph job did not complete: {job}")
        time.sleep(poll_s)
        job = client.get(f"/jobs/{job['id']}").raise_for_status().json()
    return job


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", default="http://localhost:8000")
    parser.add_argument("--dataset", type=Path, default=Path("../shared/datasets/instance_small"))
    parser.add_argument("--thresholds", default="0.85,0.88,0.9,0.92,0.94,0.96")
    args = parser.parse_args()

    root = args.dataset.resolve()
    labels, paths = ground_truth(root)
    with httpx.Client(base_url=args.api, timeout=120) as client:
        answer = client.post("/images/exists", json={"ids": sorted(labels)}).raise_for_status().json()
        existing = set(answer["existing"])
        for image_id, rel in paths.items():
            if image_id not in existing:
                data = (root / rel).read_bytes()
                client.post("/index_image", files={"file": (Path(rel).name, data)}, data={"filename": rel})
        job = wait_for_graph(client)
        for threshold in (float(t) for t in args.thresholds.split(",")):
            body = client.get("/duplicates", params={"threshold": threshold, "limit": 1000}).raise_for_status().json()
            groups = [g["ids"] for g in body["groups"]]
            line = {
                "benchmark": "duplicates",
                "dataset": root.name,
                "threshold": threshold,
                "k": job["k"],
                "groups": len(groups),
                "images_grouped": sum(len(g) for g in groups),
                **score_groups(groups, labels),
            }
            print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
