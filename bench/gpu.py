"""`pdengine bench gpu`: the GPU suite (bench/gpu_suite.py; see its docstring)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_suite import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
