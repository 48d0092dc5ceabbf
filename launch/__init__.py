"""SLURM launch helpers: sbatch rendering/submission and a local test cluster.

    python -m launch.submit model=xl-sft mode=lora trainer=gpu trainer.devices=4 trainer.num_nodes=2 --dry-run
"""
