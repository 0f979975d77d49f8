"""What every GPU benchmark record carries and where it goes: one JSON file per run,
benchmarks/results/gpu-<suite><tag>-<device>-<date>.json (the issues' record format)."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import triton


def header(suite: str, device: torch.device) -> dict:
    return {"suite": suite, "device": torch.cuda.get_device_name() if device.type == "cuda" else device.type,
            "torch": torch.__version__, "triton": triton.__version__, "date": time.strftime("%Y-%m-%d")}


def write(record: dict, out_dir: Path, tag: str = "") -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"gpu-{record['suite']}{tag}-{record['device'].replace(' ', '_')}-{record['date']}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")
    return path


def arg_parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--only", nargs="+", help="implementations to time (default: all)")
    ap.add_argument("--tag", default="", help="file name tag, e.g. -sweep-4096-4")
    return ap
