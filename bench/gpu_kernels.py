"""All kernel checks of the issue in one GPU run: loss kernels (bench/gpu_loss.py) and optimizers
(bench/gpu_optim.py), each checking correctness at full size against its reference and timing it beside
torch, Liger and CCE. Prints the device line and both tables last.

    python bench/gpu_kernels.py [--json rows.json]
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_loss  # noqa: E402
import gpu_optim  # noqa: E402


def main() -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_kernels.py needs a CUDA device")
    loss_rows = gpu_loss.main(quick=True)
    torch.cuda.empty_cache()
    optim_rows = gpu_optim.main()
    return dict(loss=loss_rows, optim=optim_rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None, help="also write all rows to this file")
    args = parser.parse_args()
    rows = main()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"python {sys.version.split()[0]}")
    print("== loss kernels")
    gpu_loss.print_table(rows["loss"])
    print("== optimizers")
    for r in rows["optim"]:
        print(f"{r['what']:<84} {r['value']:>10} {r['unit']:<5} {r.get('note', '')}")
