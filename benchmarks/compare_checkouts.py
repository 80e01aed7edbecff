"""Median step time of the same short tiny-SD run under two checkouts, alternating rounds."""
import json, os, statistics, subprocess, sys, tempfile
from pathlib import Path
roots = {"before (310fcad)": "/work/before", "after": "/work/main"}
assets = Path(tempfile.mkdtemp())
subprocess.run([sys.executable, "-m", "controlnet_trainer.fixtures", "--output_dir", str(assets), "--num_rows", "64"], check=True, cwd="/work/main", env=os.environ | {"PYTHONPATH": "/work/main"}, capture_output=True)
results = {name: [] for name in roots}
for round_ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
    for name, root in roots.items():
        out = assets / f"out-{round_}-{Path(root).name}"
        for cached in ([], ["--cache_latents", "--cache_text_embeddings", f"--embeddings_cache_dir={assets}/cache-{Path(root).name}"]):
            out_c = Path(str(out) + ("-cached" if cached else ""))
            cmd = [sys.executable, "train_controlnet.py", f"--pretrained_model_name_or_path={assets}/tiny-sd", f"--dataset_name={assets}/fill",
                   f"--output_dir={out_c}", "--resolution=64", "--train_batch_size=4", "--max_train_steps=40", "--learning_rate=1e-4",
                   "--lr_warmup_steps=0", "--checkpointing_steps=1000", "--validation_steps=1000", "--seed=0", "--report_to=none", *cached]
            subprocess.run(cmd, check=True, cwd=root, env=os.environ | {"PYTHONPATH": root}, capture_output=True)
            records = [json.loads(l) for l in (out_c / "metrics.jsonl").read_text().splitlines()]
            steps = [r["step_seconds"] for r in records if "step_seconds" in r and r["step"] > 5]
            results[name].append((("cached" if cached else "uncached"), statistics.median(steps)))
for name, values in results.items():
    for kind in ("uncached", "cached"):
        xs = [v for k, v in values if k == kind]
        print(f"{name:18} {kind:9} median step {statistics.median(xs)*1000:.1f} ms  rounds {[round(x*1000,1) for x in xs]}")
