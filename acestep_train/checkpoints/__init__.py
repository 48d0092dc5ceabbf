"""Released checkpoint folders: sources (local folder or modelscope), safetensors I/O, variants, key manifests."""

from pathlib import Path

# Names and shapes of every tensor in the released files (facts, no weights): see manifests/README.md.
MANIFEST_DIR = Path(__file__).resolve().parent / "manifests"
