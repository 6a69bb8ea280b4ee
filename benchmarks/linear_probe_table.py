"""The linear-probe table of the README: frozen features of each objective's tiny model on the embedded data.

    python -m benchmarks.linear_probe_table [--steps 60] [--images 2048] [--out DIR] [--only NAME,...]

Each row trains its tiny config (configs/<objective>/tiny.yaml) for ``--steps`` steps on 2 gloo
ranks over captioned Fashion-MNIST shards (the first ``--images`` images of the embedded test
split, so the pretraining saw probe images without their labels), then runs the evaluation
stage's linear probe (configs/eval/linear_probe.yaml: logistic regression on frozen features of
the Fashion-MNIST test split, C chosen on a validation slice). ``random_init`` is SimCLR's
network trained at learning rate 0: its initial weights, with BatchNorm statistics of the data
(one step would leave them near their initial values and the probe near chance). Prints one JSON object:
name -> lp_acc1, steps, wall seconds of training.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import webdataset as wds
from PIL import Image

from pipeline.embedded import CLASSNAMES, fashion_mnist_test

REPO = Path(__file__).resolve().parents[1]
# name -> (config, overrides); every run also gets data.path, run.run_dir and run.steps
ROWS = {
    "random_init": ("configs/simclr/tiny.yaml", ["optim.lr=0"]),
    "simclr": ("configs/simclr/tiny.yaml", []),
    "moco_v2": ("configs/moco/tiny.yaml", []),
    "cpc": ("configs/cpc/tiny.yaml", []),
    "clip": ("configs/clip/tiny.yaml", []),
}


def write_shards(out: Path, images: int, shards: int = 8) -> Path:
    pixels, labels = fashion_mnist_test()
    (out / "shards").mkdir(parents=True, exist_ok=True)
    per_shard, sizes = images // shards, {}
    for shard in range(shards):
        name = f"shards/{shard:06d}.tar"
        with wds.TarWriter(str(out / name)) as sink:
            for i in range(shard * per_shard, (shard + 1) * per_shard):
                jpeg = io.BytesIO()
                Image.fromarray(pixels[i]).convert("RGB").save(jpeg, format="JPEG", quality=90)
                sink.write({"__key__": f"fmnist{i:06d}", "jpg": jpeg.getvalue(),
                            "txt": f"a photo of a {CLASSNAMES[labels[i]]}"})
        sizes[name] = per_shard
    (out / "sizes.json").write_text(json.dumps(sizes))
    return out


def run(args: list[str], torchrun: bool) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun else []
    proc = subprocess.run([sys.executable, *launcher, *args], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args[:4])} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def probe(run_dir: Path) -> float:
    run(["-m", "pipeline.evaluate", "--checkpoint", str(run_dir), "--config", "configs/eval/linear_probe.yaml"],
        torchrun=False)
    results = [json.loads(p.read_text()) for p in (run_dir / "eval").rglob("*.json")]
    return next(r["metrics"]["lp_acc1"] for r in results if "lp_acc1" in r.get("metrics", {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--out", default="")
    parser.add_argument("--only", default="", help="comma-separated row names (default: all)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="lp_table_"))
    data = write_shards(out / "data", args.images)
    table = {}
    for name in [n for n in args.only.split(",") if n] or list(ROWS):
        config, overrides = ROWS[name]
        run_dir, start = out / name, time.time()
        run(["-m", "train.main", "--config", config, f"data.path={data}", f"run.run_dir={run_dir}",
             f"run.steps={args.steps}", "log.tensorboard=false", *overrides], torchrun=True)
        table[name] = {"lp_acc1": probe(run_dir), "steps": args.steps, "train_s": round(time.time() - start, 1)}
        print(json.dumps({name: table[name]}), file=sys.stderr)
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
