import pathlib, random, json
from lloco_index.models import load_base_model
from lloco_index.corpus import build_corpus
_, tok = load_base_model("smollm2-135m", device="cpu")
py = sorted(pathlib.Path("/usr/share/doc/python3.11-doc/html/_sources").rglob("*.txt"))
lx = sorted(f for f in pathlib.Path("/usr/share/doc/linux-doc-6.1/Documentation").rglob("*.rst.gz") if "translations" not in f.parts)
random.Random(0).shuffle(py); random.Random(1).shuffle(lx)
files = [f for pair in zip(py, lx[:len(py)]) for f in pair] + lx[len(py):]
print(build_corpus(files, tok, pathlib.Path("/work/main/.devdata/corpus.npz"), 7_000_000))
