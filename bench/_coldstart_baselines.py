"""The baselines of bench/coldstart_node.py: Hugging Face ``from_pretrained`` in a process of
its own, cold from a local directory, after a download from S3 (KServe's storage initializer),
and warm in a process that has already built the model class (the fair baseline of a DRAM hit);
and the start-up time of a pre-started instance process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent / ".data" / "coldstart"


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


BASELINE = r"""
import json, sys, time
t0 = time.monotonic()
import torch, transformers
from transformers import AutoModelForCausalLM
t1 = time.monotonic()
src = sys.argv[1]
download_s = 0.0
if src.startswith("s3://"):
    import boto3, os, tempfile
    from concurrent.futures import ThreadPoolExecutor
    bucket, prefix = src[5:].split("/", 1)
    s3 = boto3.client("s3", endpoint_url=os.environ["SLLM_S3_ENDPOINT"], region_name="us-east-1")
    dst = tempfile.mkdtemp(dir=sys.argv[2])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: s3.download_file(bucket, k, os.path.join(dst, k.rsplit("/", 1)[1])), keys))
    download_s = time.monotonic() - t1
    src = dst
t2 = time.monotonic()
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
for p in model.parameters():  # every weight page in memory and mapped, as a premapped DRAM hit
    flat = p.detach().reshape(-1).view(torch.uint8)
    int(flat[::4096].sum())
t3 = time.monotonic()
with torch.inference_mode():
    model(input_ids=torch.tensor([[1]]))
t4 = time.monotonic()
print(json.dumps({"import_s": t1 - t0, "download_s": download_s, "load_s": t3 - t2,
                  "forward_s": t4 - t3}))
"""


BASELINE_WARM = r"""
import json, os, sys, time
import torch
from transformers import AutoModelForCausalLM
src = sys.argv[1]
def ready():
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    for p in model.parameters():  # every weight page in memory and mapped
        flat = p.detach().reshape(-1).view(torch.uint8)
        int(flat[::4096].sum())
    return model
def forward(model):
    with torch.inference_mode():
        model(input_ids=torch.tensor([[1]]))
# the model class's first build, the first read of the files and the kernels' first use (as
# the pool warm-up has them): not timed
forward(ready())
for name in os.listdir(src):  # the files read just before: warm
    with open(os.path.join(src, name), "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass
t0 = time.monotonic()
model = ready()
t1 = time.monotonic()
forward(model)
print(json.dumps({"load_s": t1 - t0, "forward_s": time.monotonic() - t1}))
"""


def run_baseline(source: str, env: dict[str, str]) -> dict[str, float]:
    scratch = DATA / "download"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    drop_caches()
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", BASELINE, source, str(scratch)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_total_s"] = time.monotonic() - start
    shutil.rmtree(scratch, ignore_errors=True)
    return result


def run_warm_baseline(hf_dir: Path, env: dict[str, str]) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", BASELINE_WARM, str(hf_dir)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    result["load_average"] = os.getloadavg()[0]
    return result


def process_start() -> float:
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.instance.worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None and proc.stdin is not None
    line = proc.stdout.readline()
    elapsed = time.monotonic() - start
    assert json.loads(line)["event"] == "idle"
    proc.stdin.close()
    proc.wait(timeout=30)
    return elapsed
