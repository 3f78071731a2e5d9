import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
# The suite tests the CPU model (gloo ranks, the CPU accommodations of compat/cpu.py): on a GPU
# host, hide CUDA from this process and from every rank it spawns (run_ranks, torchrun
# subprocesses inherit the environment), so the tests run exactly as on a CPU machine and never
# put several NCCL ranks on one GPU. Set LSS_TEST_CUDA=1 to keep CUDA visible (the GPU checks
# are `bash launch/gpu_check.sh`, not this suite).
if os.environ.get("LSS_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", category=FutureWarning)
