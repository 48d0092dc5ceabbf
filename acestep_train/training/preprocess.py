"""``acestep-preprocess`` (``python -m acestep_train.training.preprocess``): build the feature cache and stop.

    acestep-preprocess model=xl-sft data=audio data.metadata=/data/songs/metadata.csv

The same Hydra config as training; it builds the cache (``training.features.BundleEncoder``) and stops, like
``preprocess_only=true``.
"""

from __future__ import annotations


def main() -> None:
    import hydra

    from acestep_train.checkpoints.variants import CONF_DIR

    @hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
    def _run(cfg) -> None:
        from acestep_train.training.train import run

        cfg.preprocess_only = True
        run(cfg)

    from acestep_train.cli import reported_errors

    with reported_errors():
        _run()


if __name__ == "__main__":
    main()
