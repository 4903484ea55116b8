"""sDPO training from the command line.

    python train.py                                   # the built-in tiny run (configs/tiny.toml)
    python train.py --config configs/solar-10.7b-sdpo.toml --train.output_dir=runs/solar
    torchrun --nproc_per_node 8 train.py --config configs/solar-10.7b-sdpo.toml
    python train.py --config ... --resume             # continue a killed run in its output_dir

Any config key can be overridden as --section.key=value (see `python train.py --help`).
Exit codes: 0 done, 1 training error (e.g. a non-finite loss) or a file that cannot be
read or written, 2 bad config or input (also a damaged run directory on --resume, and an
output directory a live run holds), 3 stopped by train.stop_after, 75 preempted (SIGTERM or
SIGUSR1: state saved at the step the ranks stopped after; add --resume), 128 + the signal's
number when train.preempt_grace_s ran out first (--resume continues from the last save).
"""

import os
import sys
from pathlib import Path

from sdpo.runtime.config import ConfigError, parse_args

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny.toml"


def main(argv: list[str]) -> int:
    from sdpo.data.read import DataError
    from sdpo.data.tokenizer import TokenizerError
    from sdpo.models.hf_config import CheckpointError
    from sdpo.runtime import distributed, lock, preempt
    from sdpo.runtime.run import Preempted, StopRequested, TrainingError
    from sdpo.stepwise import train

    try:
        cfg = parse_args(argv, default_config=DEFAULT_CONFIG)
        preempt.install(cfg.train.preempt_grace_s)
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
    except Preempted as e:
        rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"{rank}{e}; continue with the same command plus --resume", file=sys.stderr, flush=True)
        try:
            distributed.destroy()  # every rank stopped after the same step: leave together
        except RuntimeError:
            pass  # a peer already gone (torchrun ends the others once one exits): the state is saved
        return preempt.PREEMPTED
    finally:
        distributed.destroy(barrier=False)  # no-op after a clean finish
        lock.release()
        preempt.uninstall()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
