"""The code's layout as docs/CODE.md states it: scripts import modules, never another script."""
import ast

from conftest import REPO

# the command-line entry points a user runs; everything else at the top level is a module below them
SCRIPTS = {"train", "distill", "sample", "evaluate", "export", "upsampler", "app"}


def imported_names(path):
    """The top-level names of every module a file imports, at any depth in the file (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_file_of_the_project_imports_a_script():
    files = sorted(REPO.glob("*.py")) + sorted((REPO / "bench").glob("*.py"))
    assert {f.stem for f in files} >= SCRIPTS | {"cli", "dataset", "model", "sampling", "scoring", "training"}
    offenders = {f"{f.relative_to(REPO)} imports {', '.join(sorted(imported_names(f) & SCRIPTS))}"
                 for f in files if imported_names(f) & SCRIPTS}
    assert not offenders, offenders


def test_every_script_runs_as_a_script():
    """Each name in SCRIPTS is an entry point (its main() behind the __main__ guard), so the list stays true."""
    for name in SCRIPTS:
        assert 'if __name__ == "__main__":' in (REPO / f"{name}.py").read_text(), name


def test_the_code_a_model_folder_carries_needs_only_diffusers_and_what_it_installs():
    """model.FOLDER_CODE runs where only torch, diffusers, safetensors and Pillow were installed (numpy and tqdm come
    with them): every module it imports is one of those, the standard library, or one of the carried files."""
    import sys

    from model import FOLDER_CODE

    carried = {name.removesuffix(".py") for name in FOLDER_CODE}
    allowed = {"torch", "diffusers", "safetensors", "PIL", "numpy", "tqdm"} | carried | set(sys.stdlib_module_names)
    for name in FOLDER_CODE:
        extra = imported_names(REPO / name) - allowed
        assert not extra, f"{name} imports {sorted(extra)}"
