"""``python -m acestep_train [hydra overrides]``: train. See ``conf/train.yaml`` and the README."""

from acestep_train.training.train import main

if __name__ == "__main__":
    main()
