"""The package's layering and import graph: the contracts in ``.importlinter`` hold, and no module imports itself
back through a chain of others (an import circle), counting imports made inside functions too."""

import subprocess
import sys
from pathlib import Path

import grimp
import networkx as nx

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("acestep_train", "datamodules")


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--config", str(REPO / ".importlinter"), "--no-cache"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def import_graph() -> nx.DiGraph:
    """Module-level import graph of our packages (grimp reads every import statement, lazy ones included)."""
    # Annotation-only imports (under TYPE_CHECKING) never run, so they cannot make a circle at import time.
    g = grimp.build_graph(*PACKAGES, cache_dir=None, exclude_type_checking_imports=True)
    graph = nx.DiGraph()
    for module in g.modules:
        graph.add_node(module)
        for imported in g.find_modules_directly_imported_by(module):
            # A package importing its own submodules (an __init__ re-export) is not a circle in the design sense.
            if not imported.startswith(module + "."):
                graph.add_edge(module, imported)
    return graph


def test_no_import_circles():
    cycles = [c for c in nx.simple_cycles(import_graph()) if len(c) > 1]
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c + [c[0]]) for c in cycles[:10])


def test_cycle_check_sees_a_circle():
    """Negative control: the check does find a circle when one is added to the graph."""
    graph = import_graph()
    graph.add_edge("acestep_train.models.dit", "acestep_train.training.train")
    graph.add_edge("acestep_train.training.train", "acestep_train.models.dit")
    assert any(len(c) > 1 for c in nx.simple_cycles(graph))
