"""sDPO training from the command line.

    python train.py                                   # the built-in tiny run (configs/tiny.toml)
    python train.py --config configs/solar-10.7b-sdpo.toml --train.output_dir=runs/solar
    torchrun --nproc_per_node 8 train.py --config configs/solar-10.7b-sdpo.toml
    python train.py --config ... --resume             # continue a killed run in its output_dir

Any config key can be overridden as --section.key=value (see `python train.py --help`).
Exit codes: 0 done, 1 training error (e.g. a non-finite loss) or a file that cannot be
read or written, 2 bad config or input (also a damaged run directory on --resume),
3 stopped by train.stop_after.
"""

import sys
from pathlib import Path

from sdpo.runtime.config import ConfigError, parse_args

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny.toml"


def main(argv: list[str]) -> int:
    from sdpo.data.read import DataError
    from sdpo.data.tokenizer import TokenizerError
    from sdpo.models.hf_config import CheckpointError
    from sdpo.runtime import distributed
    from sdpo.runtime.run import StopRequested, TrainingError
    from sdpo.stepwise import train

    try:
        cfg = parse_args(argv, default_config=DEFAULT_CONFIG)
        train(cfg)
        distributed.destroy()  # every rank got here: leave together
    except (ConfigError, DataError, TokenizerError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingError, OSError) as e:  # OSError: a path that cannot be read or written, named in e
        print(f"error: {e}", file=sys.stderr)
        return 1
    except StopRequested as e:
        print(str(e), file=sys.stderr)
        return 3
    finally:
        distributed.destroy(barrier=False)  # no-op after a clean finish
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
