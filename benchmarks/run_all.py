"""`make bench`: every benchmark, each reporting ratios against a baseline measured in the same run.

Not included (long): `largest_model.py` (writes and quantizes a 15 GiB LLaDA-8B-shaped checkpoint)."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
for script, args in [("peak_rss.py", ["--layers", "4", "16", "32", "--d-model", "1024"]),
                     ("kernels.py", []),
                     ("act_paths.py", []),
                     ("transform_overhead.py", []),
                     ("method_matrix.py", []),
                     ("method_nll.py", []),
                     ("wa_matrix.py", []),
                     ("compare_gptq.py", ["--repeats", "3"])]:
    print(f"== {script} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, str(HERE / script), *args], check=True, cwd=HERE)
