"""Print the budget plan of a run config without loading any weights.

    python scripts/plan.py --config configs/fusion_4llm.yaml [--batch-size 8 --seq-len 512]

Exit 0 within budget; 2 with the table when over budget (or on a config error).
"""

import argparse
import sys

from fusion_llm.budget import plan
from fusion_llm.config import ConfigError
from fusion_llm.runconfig import load_run_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Budget plan of a fused model (meta device, no weights).")
    parser.add_argument("--config", required=True, help="a run config YAML (its model section is planned)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch for the memory estimate")
    parser.add_argument("--seq-len", type=int, default=None, help="sequence length for the memory estimate")
    args, overrides = parser.parse_known_args(argv)
    try:
        run = load_run_config(args.config, overrides)
        result = plan(run.fusion_config(), args.batch_size or run.train.batch_size,
                      args.seq_len or run.data.max_length)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result.table())
    if not result.within_budget:
        print(f"error: budget_limit: the plan needs {result.total_bf16_equivalent / 1e9:.3f}B bf16-equivalent "
              f"parameters, over the limit of {result.limit / 1e9:.3f}B", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
