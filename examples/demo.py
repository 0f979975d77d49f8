"""`make demo`: Model Stock on ViT-B-32-shaped checkpoints, file to file, as a user runs it.

1. Writes a pre-trained and two fine-tuned checkpoints with open_clip's ViT-B-32 architecture
   (random weights; the fine-tuned updates share a direction, as real runs' do) into
   demo-output/ (once; reused afterwards).
2. Merges them with the `modelstock merge` command, with its JSON report and layer-wise plot.
3. Loads the merged weights into open_clip's ViT-B-32 with strict=True and runs it.

No download: everything is generated here. (The full demo on real data, with DynOPool, comes
with the training issue.)
"""
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
OUT = Path(os.environ.get("DEMO_OUTPUT", "demo-output"))


def main() -> int:
    import torch

    from modelstock.synthetic import clip_shapes, write_synthetic

    OUT.mkdir(exist_ok=True)
    paths = [OUT / f"{name}.safetensors" for name in ("base", "ft1", "ft2")]
    if not all(p.exists() for p in paths):
        print("writing ViT-B-32-shaped checkpoints (3 x 605 MB) ...", flush=True)
        start = time.perf_counter()
        write_synthetic(OUT, clip_shapes("ViT-B-32"), 2, seed=0)
        print(f"  done in {time.perf_counter() - start:.1f} s", flush=True)

    merged = OUT / "merged.safetensors"
    cmd = [sys.executable, "-m", "modelstock", "merge", *map(str, paths), "-o", str(merged),
           "--report", str(OUT / "report.json"), "--plot", str(OUT / "layers.png"), "--force"]
    print("$ modelstock merge " + " ".join(cmd[4:]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"(the whole command, interpreter start included: {time.perf_counter() - start:.2f} s)")

    import open_clip
    from safetensors.torch import load_file

    model = open_clip.create_model("ViT-B-32", pretrained=None)
    model.load_state_dict(load_file(merged), strict=True)
    model.eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    with torch.no_grad():
        image, text, _ = model(torch.rand(1, 3, 224, 224), tokenizer(["a diagram", "a dog"]))
    print(f"merged model loads into open_clip ViT-B-32 (strict) and runs: image features {tuple(image.shape)}, "
          f"text features {tuple(text.shape)}")
    print(f"outputs in {OUT}/: merged.safetensors, report.json, layers.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
