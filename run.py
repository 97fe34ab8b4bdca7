"""elsa command line: `python run.py method=elsa sparsity=0.9` (see README)."""
import sys

import hydra

from elsa.run.recipe import main, refuse_old_spellings


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def cli(cfg) -> None:
    main(cfg)


if __name__ == "__main__":
    refuse_old_spellings(sys.argv[1:])
    cli()
