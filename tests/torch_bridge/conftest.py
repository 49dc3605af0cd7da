import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "models"))  # hf_models, the NewComputeBench transform
