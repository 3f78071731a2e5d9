import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
# a collective whose bytes comm.record() cannot read fails the test (launched trainers inherit it)
os.environ.setdefault("LSS_STRICT_COMM", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", category=FutureWarning)
