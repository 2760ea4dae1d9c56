"""camsweep entry point: ``python run.py [key=value ...]`` (see conf/config.yaml)."""

import sys

if __name__ == "__main__" and "stage=status" in sys.argv:  # read-only: no torch, no Hydra
    from pipeline.status import main as status_main
    from pipeline.status import requested

    if requested(sys.argv[1:]):
        sys.exit(status_main(sys.argv[1:]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline.cli import check_overrides, install_hydra_config_saver, main  # noqa: E402
from pipeline.config import expand_target_shorthand  # noqa: E402
from pipeline.errors import ConfigError  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def app(cfg: DictConfig):
    return main(cfg)


if __name__ == "__main__":
    try:
        sys.argv[1:] = expand_target_shorthand(sys.argv[1:])
        check_overrides(sys.argv[1:])
        install_hydra_config_saver()
        app()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        # Every done row is on disk: the same command resumes.
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
