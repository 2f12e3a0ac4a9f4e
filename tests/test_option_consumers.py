"""Every option declared in library/options/ is read somewhere (issue 13 §2), and which options no test passes.

The options are collected from the real parsers: each script's module-level `setup_parser()` (top level, tools/,
networks/, finetune/), with `add_argument` patched to note the file each option is declared in; public `add_*`
functions of library/options that no script uses are called on a fresh parser too. An option counts as read when
a module the script imports (statically, lazy imports included) loads its destination:

- an attribute load `<anything>.<dest>` (args.x, opts.x, a settings object built from args);
- `getattr(<anything>, "<dest>")`, or `getattr(x, f"..{name}..")` whose pattern matches the destination;
- a string constant equal to the destination anywhere else (name tables such as dataset_config's KEY_SPECS or
  metadata's FLAGS_AS_GIVEN feed `getattr(args, name)`); docstrings and f-string text do not count.

Declarations never count: nothing inside an `add_argument(...)` call, and in library/options no function that calls
`add_argument` (the tuple of names that add_image_arguments loops over is a declaration, not a read). The check_* and
*_from_args functions there do count. tests/ is not searched.

An option declared by library/options but in no script's parser fails too (it is offered nowhere).

The second part prints (and never fails on) the options that no test passes: no `--flag` word in the strings of
tests/ Python code and no TOML key of that name, in TOML fixtures or in TOML text written by a test
(tests/scripts/kohya_flags/*.txt, kohya's --help dumps, is not read). Those whose destination is at least a
keyword argument / dict key / attribute store somewhere in tests/ are marked, since such a name may just as well be
a library function's parameter. See it with `python -m tests.test_option_consumers` (which also lists the unread
options with their reasons, the options read only through name tables, and the flags a script offers that only
other scripts' code reads) or with `pytest -s tests/test_option_consumers.py`.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import re
import sys
import tomllib
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OPTIONS_DIR = ROOT / "library" / "options"
SOURCE_DIRS = ("library", "networks", "tools", "finetune")  # plus the top-level scripts
SCRIPT_DIRS = (".", "tools", "networks", "finetune")
TESTS_DIR = ROOT / "tests"
NOT_TEST_INPUT = (TESTS_DIR / "scripts" / "kohya_flags",)  # kohya --help dumps, not options a test passes

# dest -> why nothing reads it on purpose. Keep this short and literally true (the help text says so too).
ALLOW_INERT: dict[str, str] = {
    "sdpa": "selects what already happens: PyTorch scaled-dot-product attention is the default attention of the "
            "trainer (network_trainer._set_attention) and of diffusers' U-Net in the generator unless --xformers; "
            "both help texts say '(the default)'; kohya also lets --xformers win over --sdpa",
    "mem_eff_attn": "kohya's own memory-efficient attention; here the trainer always uses PyTorch SDPA unless "
                    "--xformers (network_trainer._set_attention: 'also serves --mem_eff_attn'); help: 'served by "
                    "PyTorch SDPA here'",
}

@dataclass
class Option:
    flag: str                      # the first long option string, e.g. --noise_offset
    dest: str
    file: str                      # declaring file, relative to the repository root
    scripts: set[str] = field(default_factory=set)  # scripts whose parser has it (relative paths)

    @property
    def key(self) -> tuple[str, str]:
        return self.flag, self.file


# ---------------------------------------------------------------------------------------------------------------
# options


@contextmanager
def _recording_declarations(records: list[tuple[argparse.Action, Path]]):
    """Patch argparse's add_argument to note each new action with the file of the code that declared it."""
    original = argparse._ActionsContainer.add_argument

    def add_argument(self, *args, **kwargs):
        action = original(self, *args, **kwargs)
        records.append((action, Path(sys._getframe(1).f_code.co_filename).resolve()))
        return action

    argparse._ActionsContainer.add_argument = add_argument
    try:
        yield
    finally:
        argparse._ActionsContainer.add_argument = original


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _defines_setup_parser(path: Path) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return any(isinstance(node, ast.FunctionDef) and node.name == "setup_parser" for node in tree.body)


def script_files() -> list[Path]:
    files = []
    for folder in SCRIPT_DIRS:
        files += [path for path in sorted((ROOT / folder).glob("*.py"))
                  if path.name != "__init__.py" and _defines_setup_parser(path)]
    return files


def _record_options(records, script: str | None, options: dict[tuple[str, str], Option]) -> None:
    for action, path in records:
        if not path.is_relative_to(OPTIONS_DIR) or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        if not action.option_strings or action.dest == argparse.SUPPRESS:
            continue
        flag = next((s for s in action.option_strings if s.startswith("--")), action.option_strings[0])
        option = options.setdefault((flag, str(path.relative_to(ROOT))),
                                    Option(flag, action.dest, str(path.relative_to(ROOT))))
        if script:
            option.scripts.add(script)


def _dummy_keyword(parameter: inspect.Parameter):
    return True if "bool" in str(parameter.annotation) else ""


def collect_options() -> dict[tuple[str, str], Option]:
    """(flag, declaring file) -> Option, for every option that library/options declares."""
    options: dict[tuple[str, str], Option] = {}
    for path in script_files():
        module = importlib.import_module(_module_name(path))
        records: list = []
        with _recording_declarations(records):
            module.setup_parser()
        _record_options(records, str(path.relative_to(ROOT)), options)
    for path in sorted(OPTIONS_DIR.glob("*.py")):
        module = importlib.import_module(_module_name(path))
        for name, function in vars(module).items():
            if not (name.startswith("add_") and inspect.isfunction(function)
                    and function.__module__ == module.__name__):
                continue
            parameters = list(inspect.signature(function).parameters.values())
            keywords = {p.name: _dummy_keyword(p) for p in parameters[1:]
                        if p.kind is p.KEYWORD_ONLY and p.default is p.empty}
            records = []
            with _recording_declarations(records):
                function(argparse.ArgumentParser(add_help=False), **keywords)
            _record_options(records, None, options)
    return options


# ---------------------------------------------------------------------------------------------------------------
# reads in the project's sources


@dataclass
class FileReads:
    attributes: set[str] = field(default_factory=set)    # x.<name> loads
    getattr_names: set[str] = field(default_factory=set)  # getattr(x, "<name>") / hasattr
    getattr_patterns: list[re.Pattern] = field(default_factory=list)  # getattr(x, f"..{y}..")
    strings: set[str] = field(default_factory=set)       # other identifier-like string constants
    imports: set[str] = field(default_factory=set)       # module names this file imports (anywhere)


IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _is_add_argument(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "add_argument")


def _declares(function: ast.AST) -> bool:
    return any(_is_add_argument(node) for node in ast.walk(function))


def _fstring_pattern(node: ast.JoinedStr) -> re.Pattern:
    parts = [re.escape(part.value) if isinstance(part, ast.Constant) else ".+" for part in node.values]
    return re.compile("".join(parts) + r"\Z")


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants of a module, its classes and functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


class _ReadCollector(ast.NodeVisitor):
    def __init__(self, reads: FileReads, package: str, in_options: bool, docstrings: set[int]):
        self.reads, self.package, self.in_options, self.docstrings = reads, package, in_options, docstrings

    def visit_FunctionDef(self, node) -> None:
        if self.in_options and _declares(node):
            self.visit_imports_only(node)  # a declaring function of library/options: its names are declarations
            return
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_imports_only(self, node: ast.AST) -> None:
        for child in ast.walk(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        self.reads.imports.update(alias.name for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            anchor = self.package.split(".")[: len(self.package.split(".")) - node.level + 1]
            base = ".".join(part for part in (*anchor, base) if part)
        self.reads.imports.add(base)
        self.reads.imports.update(f"{base}.{alias.name}" for alias in node.names)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.ctx, ast.Load):
            self.reads.attributes.add(node.attr)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if _is_add_argument(node):
            return  # a declaration (here or in a tool's own parser), not a read
        function = node.func
        name = function.id if isinstance(function, ast.Name) else getattr(function, "attr", None)
        if name in ("getattr", "hasattr") and len(node.args) >= 2:
            target = node.args[1]
            if isinstance(target, ast.Constant) and isinstance(target.value, str):
                self.reads.getattr_names.add(target.value)
            elif isinstance(target, ast.JoinedStr):
                self.reads.getattr_patterns.append(_fstring_pattern(target))
        if name == "import_module" and node.args and isinstance(node.args[0], ast.Constant):
            self.reads.imports.add(str(node.args[0].value))
        self.generic_visit(node)

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        for part in node.values:  # the text of an f-string is no name; its {expressions} may read
            if not isinstance(part, ast.Constant):
                self.visit(part)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and IDENTIFIER.match(node.value) and id(node) not in self.docstrings:
            self.reads.strings.add(node.value)


def source_files() -> list[Path]:
    files = sorted(ROOT.glob("*.py"))
    for folder in SOURCE_DIRS:
        files += sorted((ROOT / folder).rglob("*.py"))
    return files


def collect_reads() -> dict[str, FileReads]:
    """module name -> what that file reads and imports."""
    result = {}
    for path in source_files():
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        reads = FileReads()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        _ReadCollector(reads, package, path.is_relative_to(OPTIONS_DIR), _docstrings(tree)).visit(tree)
        result[name] = reads
    return result


def import_closure(start: str, reads: dict[str, FileReads]) -> set[str]:
    """Project modules `start` imports, directly or through others (parent packages included)."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen or name not in reads:
            continue
        seen.add(name)
        for imported in reads[name].imports:
            parts = imported.split(".")
            todo += [".".join(parts[:end]) for end in range(1, len(parts) + 1)]
    return seen


def read_evidence(dest: str, modules: set[str], reads: dict[str, FileReads]) -> dict[str, list[str]]:
    """kind of read -> modules reading `dest` that way ("attribute", "getattr" or "name")."""
    evidence: dict[str, list[str]] = defaultdict(list)
    for name in sorted(modules):
        file_reads = reads[name]
        if dest in file_reads.attributes:
            evidence["attribute"].append(name)
        if dest in file_reads.getattr_names or any(p.match(dest) for p in file_reads.getattr_patterns):
            evidence["getattr"].append(name)
        if dest in file_reads.strings:
            evidence["name"].append(name)
    return evidence


def find_unread(options: dict[tuple[str, str], Option], reads: dict[str, FileReads]):
    """(unread options, options in no script's parser, options only read through a name table)."""
    closures = {script: import_closure(_module_name(ROOT / script), reads)
                for script in {s for option in options.values() for s in option.scripts}}
    everything = set(reads)
    unread, orphans, names_only = [], [], []
    for option in options.values():
        if not option.scripts:
            orphans.append(option)
        modules = set().union(*(closures[s] for s in option.scripts)) if option.scripts else everything
        evidence = read_evidence(option.dest, modules, reads)
        if not evidence:
            unread.append(option)
        elif set(evidence) == {"name"}:
            names_only.append((option, evidence["name"]))
    return unread, orphans, names_only


def describe(option: Option) -> str:
    return f"{option.flag} ({option.dest}) declared in {option.file}"


# ---------------------------------------------------------------------------------------------------------------
# what tests pass


@dataclass
class PassedInputs:
    flags: set[str] = field(default_factory=set)      # --flag words in test strings (without the dashes)
    toml_keys: set[str] = field(default_factory=set)  # keys of TOML fixtures and of TOML text in tests
    names: set[str] = field(default_factory=set)      # keyword arguments, dict keys, attribute stores


FLAG_WORD = re.compile(r"(?<![\w-])--([A-Za-z][A-Za-z0-9_]*)")
TOML_KEY = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=", re.MULTILINE)


def _toml_keys(table, names: set[str]) -> None:
    if isinstance(table, dict):
        for key, value in table.items():
            names.add(key)
            _toml_keys(value, names)
    elif isinstance(table, list):
        for item in table:
            _toml_keys(item, names)


def collect_test_inputs() -> PassedInputs:
    inputs = PassedInputs()
    this_file = Path(__file__).resolve()
    for path in sorted(TESTS_DIR.rglob("*")):
        if path == this_file or any(path.is_relative_to(skip) for skip in NOT_TEST_INPUT) or not path.is_file():
            continue
        if path.suffix == ".toml":
            text = path.read_text(encoding="utf-8")
            try:
                _toml_keys(tomllib.loads(text), inputs.toml_keys)
            except tomllib.TOMLDecodeError:  # fixtures of broken files: take what looks like keys
                inputs.toml_keys.update(TOML_KEY.findall(text))
        elif path.suffix == ".py":
            add_python_inputs(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), inputs)
    return inputs


def add_python_inputs(tree: ast.AST, inputs: PassedInputs) -> None:
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            inputs.flags.update(FLAG_WORD.findall(node.value))
            inputs.toml_keys.update(TOML_KEY.findall(node.value))  # TOML written by the test
        elif isinstance(node, ast.keyword) and node.arg:
            inputs.names.add(node.arg)
        elif isinstance(node, ast.Dict):
            inputs.names.update(key.value for key in node.keys
                                if isinstance(key, ast.Constant) and isinstance(key.value, str))
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            inputs.names.add(node.attr)


def untested_options(options: dict[tuple[str, str], Option], inputs: PassedInputs) -> list[tuple[str, bool]]:
    """(description, whether a test at least uses the destination as a keyword / dict key / attribute store) for
    each flag that no test passes as `--flag` or as a TOML key. A same-named keyword may be a library function's
    parameter rather than the option, so those are only marked."""
    by_flag: dict[str, list[Option]] = defaultdict(list)
    for option in options.values():
        by_flag[option.flag].append(option)
    missing = []
    for flag, declared in sorted(by_flag.items()):
        dests = sorted({option.dest for option in declared})
        if flag[2:] in inputs.flags or any(dest in inputs.toml_keys for dest in dests):
            continue
        files = ", ".join(sorted({option.file for option in declared}))
        missing.append((f"{flag} ({', '.join(dests)}) declared in {files}",
                        any(dest in inputs.names for dest in dests)))
    return missing


def untested_report(options: dict[tuple[str, str], Option]) -> str:
    missing = untested_options(options, collect_test_inputs())
    flags = {option.flag for option in options.values()}
    by_name = sum(named for _, named in missing)
    lines = [f"{len(missing)} of {len(flags)} options declared in library/options are passed by no test (no --flag "
             f"in test code, no TOML key in a test config); {by_name} of them (marked *) are at least set somewhere "
             f"in tests/ as a keyword / dict key / attribute of the same name, {len(missing) - by_name} not at all:"]
    lines += [f"  {'*' if named else ' '} {text}" for text, named in missing]
    return "\n".join(lines)


def per_script_gaps(options: dict[tuple[str, str], Option], reads: dict[str, FileReads]) -> dict[str, list[str]]:
    """script -> flags its parser offers that nothing it imports reads (read only by other scripts)."""
    gaps: dict[str, list[str]] = defaultdict(list)
    closures: dict[str, set[str]] = {}
    for option in options.values():
        for script in option.scripts:
            if script not in closures:
                closures[script] = import_closure(_module_name(ROOT / script), reads)
            if not read_evidence(option.dest, closures[script], reads):
                gaps[script].append(option.flag)
    return {script: sorted(flags) for script, flags in sorted(gaps.items())}


# ---------------------------------------------------------------------------------------------------------------
# tests


def test_every_declared_option_is_read_somewhere():
    options = collect_options()
    assert len(options) > 200  # the real parsers were built
    unread, orphans, _ = find_unread(options, collect_reads())
    problems = [f"{describe(option)}: read nowhere its scripts import ({', '.join(sorted(option.scripts))})"
                for option in unread
                if option.scripts and option.dest not in ALLOW_INERT]
    problems += [f"{describe(option)}: no script's parser has it" for option in orphans]
    problems += [f"ALLOW_INERT[{dest!r}]: read now (or no longer declared); remove it"
                 for dest in sorted(ALLOW_INERT.keys() - {option.dest for option in unread})]
    assert not problems, "\n" + "\n".join(problems)


def test_report_options_no_test_passes():
    """Information only (run with -s to see it): never fails."""
    print("\n" + untested_report(collect_options()))


FAKE_OPTIONS = """
def add_fake_arguments(parser):
    for name in ('dead_tuple',):
        parser.add_argument(f'--{name}')
    parser.add_argument('--dead', dest='dead', help='dead')
    parser.add_argument('--by_attr')
    parser.add_argument('--by_getattr')
    parser.add_argument('--side_a')
    parser.add_argument('--in_docstring')
    parser.add_argument('--elsewhere')
"""
FAKE_USE = """
'''in_docstring'''
def run(args):
    '''dead'''
    print(f'dead {args.by_attr}', getattr(args, 'by_getattr'))
    for kind in ('a',):
        getattr(args, f'side_{kind}')
    args.dead = 1
"""
FAKE_SCRIPT = """
def main(args):
    from fakepkg import use
    use.run(args)
"""
FAKE_OTHER = """
def unrelated(args):
    return args.elsewhere
"""


def test_checker_finds_unread_options_and_accepts_reads(tmp_path, monkeypatch):
    """The checker itself: an option nobody reads is found; args.x, getattr(args, "y") and getattr with an
    f-string are reads; the option's own add_argument strings, its declaring function, docstrings, f-string text
    and stores are not; a read in a module the script does not import does not count."""
    tmp_path = tmp_path.resolve()
    package = tmp_path / "fakepkg"
    package.mkdir()
    for name, text in (("__init__", ""), ("opts", FAKE_OPTIONS), ("use", FAKE_USE), ("script", FAKE_SCRIPT),
                       ("other", FAKE_OTHER)):
        (package / f"{name}.py").write_text(text)
    this_module = sys.modules[__name__]
    monkeypatch.setattr(this_module, "ROOT", tmp_path)
    monkeypatch.setattr(this_module, "OPTIONS_DIR", package)
    monkeypatch.setattr(this_module, "SOURCE_DIRS", ("fakepkg",))
    reads = collect_reads()
    records: list = []
    namespace: dict = {}
    with _recording_declarations(records):
        exec(compile(FAKE_OPTIONS, str(package / "opts.py"), "exec"), namespace)
        namespace["add_fake_arguments"](argparse.ArgumentParser())
    options: dict = {}
    _record_options(records, "fakepkg/script.py", options)
    assert {option.dest for option in options.values()} == {"dead_tuple", "dead", "by_attr", "by_getattr",
                                                            "side_a", "in_docstring", "elsewhere"}
    assert {option.file for option in options.values()} == {"fakepkg/opts.py"}
    unread, orphans, _ = find_unread(options, reads)
    assert sorted(option.dest for option in unread) == ["dead", "dead_tuple", "elsewhere", "in_docstring"]
    assert orphans == []
    for option in options.values():
        option.scripts.clear()  # in no script's parser: searched everywhere, and reported
    unread, orphans, _ = find_unread(options, reads)
    assert sorted(option.dest for option in unread) == ["dead", "dead_tuple", "in_docstring"]
    assert len(orphans) == len(options)


def test_checker_counts_flags_and_toml_keys_as_test_inputs():
    inputs = PassedInputs()
    add_python_inputs(ast.parse("run(['--noise_offset', '0.1'], seed=1)\nargs.resume = 'x'\n"
                                "TOML = 'output_name = \"a\"'\nprint('---not_a_flag', 'x--nor_this')\n"), inputs)
    options = {(f"--{dest}", "x.py"): Option(f"--{dest}", dest, "x.py")
               for dest in ("noise_offset", "seed", "resume", "output_name", "not_a_flag", "nor_this")}
    assert [(text.split()[0], named) for text, named in untested_options(options, inputs)] == \
        [("--nor_this", False), ("--not_a_flag", False), ("--resume", True), ("--seed", True)]


def main() -> None:
    options = collect_options()
    reads = collect_reads()
    unread, orphans, names_only = find_unread(options, reads)
    print("read nowhere the declaring scripts import:")
    for option in sorted(unread, key=lambda o: o.key):
        reason = ALLOW_INERT.get(option.dest, "NOT EXCUSED")
        print(f"  {describe(option)} [{', '.join(sorted(option.scripts)) or 'no script'}]: {reason}")
    print("in no script's parser:")
    for option in sorted(orphans, key=lambda o: o.key):
        print(f"  {describe(option)}: NOT EXCUSED")
    print("read only through a string name (a table of names fed to getattr):")
    for option, modules in sorted(names_only, key=lambda item: item[0].key):
        print(f"  {describe(option)}: {', '.join(modules)}")
    print("offered by a script whose imports never read them (read only by other scripts' code):")
    for script, flags in per_script_gaps(options, reads).items():
        print(f"  {script}: {' '.join(flags)}")
    print(untested_report(options))


if __name__ == "__main__":
    main()
