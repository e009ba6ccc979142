"""The docs say only what is true of the repository: every config snippet validates as `qtraj check-config` validates
a file, every SQL example answers on the committed snapshot of the default run, every `qtraj` flag exists, every
link and every repository path they name leads to a file, and the figures they state in prose are the snapshot's.

YAML snippets (```yaml blocks, and `<<'YAML'` heredocs of ```bash blocks) follow one convention, by their first line:
  `# added to <config>`  a fragment: merged over that config file (mappings key by key), then validated;
  `# from <config>`      an excerpt: every value in it is that file's, and the file validates;
  anything else          a whole config, validated as it is; a block of family-file keys only is a family file.
A `local` entry whose `path` does not exist here is the reader's own folder: the test makes one with four
checkpoint subfolders named by its `pattern`. Fast: no Snakemake, no model.
"""

from __future__ import annotations

import argparse
import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

from qtraj.cli import build_parser, main
from qtraj.query import query
from tests.conftest import REPO_ROOT

SNAPSHOT = REPO_ROOT / "docs" / "measured" / "default"  # the default run's dataset (bench/measured.py, test_readme)
DOCUMENTS = [REPO_ROOT / "README.md", REPO_ROOT / "config" / "README.md", REPO_ROOT / "profiles" / "README.md",
             *sorted((REPO_ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
HEREDOC = re.compile(r"<<-?\s*'?(?P<tag>\w+)'?\n(?P<body>.*?)\n(?P=tag)\n", re.S)
LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")
MARKER = re.compile(r"^#\s*(?P<kind>added to|from)\s+(?P<path>\S+)")


def relative(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def fenced_blocks(document: Path) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, the body dedented by its fence's indent."""
    blocks = []
    for match in FENCE.finditer(document.read_text()):
        indent = match.group("indent")
        lines = match.group("body").splitlines()
        blocks.append((match.group("lang"), "\n".join(line[len(indent):] if line.startswith(indent) else line
                                                      for line in lines) + "\n"))
    return blocks


def code_spans(document: Path) -> list[str]:
    """The inline code of a document (outside fenced blocks), whitespace runs made one space."""
    prose = FENCE.sub("", document.read_text())
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]


def shell_commands(document: Path) -> list[str]:
    """The commands of the ```bash blocks, continuation lines joined (heredoc bodies left out), and inline code."""
    commands = []
    for lang, body in fenced_blocks(document):
        if lang not in ("bash", "sh", "console"):
            continue
        body = HEREDOC.sub("\n", body).replace("\\\n", " ")
        pending = ""
        for line in body.splitlines():
            pending = f"{pending}\n{line}" if pending else line
            if pending.count('"') % 2 == 0 and pending.count("'") % 2 == 0:  # a quoted SQL may span lines
                commands.append(pending)
                pending = ""
        if pending:
            commands.append(pending)
    return commands + code_spans(document)


def yaml_snippets() -> list[tuple[str, str]]:
    """(where, text) of every YAML block and heredoc of the docs."""
    snippets = []
    for document in DOCUMENTS:
        for index, (lang, body) in enumerate(fenced_blocks(document)):
            where = f"{relative(document)} block {index + 1}"
            if lang == "yaml":
                snippets.append((where, body))
            elif lang in ("bash", "sh"):
                snippets += [(f"{where} (heredoc)", match.group("body") + "\n") for match in HEREDOC.finditer(body)
                             if re.search(r"\.ya?ml\b", body[:match.start()].splitlines()[-1])]
    return snippets


def merged(base: dict, fragment: dict) -> dict:
    """`fragment` over `base`, mappings key by key (a fragment adds entries to a section, not a new section)."""
    result = copy.deepcopy(base)
    for key, value in fragment.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


def leaves(mapping: dict, prefix: tuple = ()) -> list[tuple[tuple, object]]:
    found = []
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            found += leaves(value, (*prefix, key))
        else:
            found.append(((*prefix, key), value))
    return found


def with_reader_folders(config: dict, tmp_path: Path) -> dict:
    """Each `local` entry whose folder is not on this machine gets one in tmp_path: four checkpoint subfolders."""
    for name, entry in config.get("local", {}).items():
        if "path" in entry and not Path(entry["path"]).exists() and not entry.get("checkpoints"):
            folder = tmp_path / "local" / name
            for step in (1000, 2000, 3000, 4000):
                (folder / entry.get("pattern", "step{step}").format(step=step)).mkdir(parents=True)
            entry["path"] = str(folder)
    return config


def family_keys() -> set[str]:
    from qtraj.schema import FAMILY_SCHEMA_PATH, load_schema

    return set(load_schema(FAMILY_SCHEMA_PATH)["properties"])


def check_config(config: dict, tmp_path: Path, capsys) -> str:
    """What `qtraj check-config` says of `config` written to a file: "" when it is valid."""
    path = tmp_path / "snippet.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    status = main(["check-config", str(path)])
    captured = capsys.readouterr()
    return "" if status == 0 else captured.err.strip()


@pytest.mark.parametrize("where, text", yaml_snippets(), ids=[where for where, _ in yaml_snippets()])
def test_every_yaml_snippet_of_the_docs_validates(where, text, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # configs name folders relative to the workflow's, as Snakemake runs them
    snippet = yaml.safe_load(text)
    assert isinstance(snippet, dict), f"{where} is not a YAML mapping"
    first_line = text.splitlines()[0]
    marker = MARKER.match(first_line)
    if marker is None and set(snippet) <= family_keys():
        (tmp_path / "families").mkdir()
        (tmp_path / "families" / "snippet.yaml").write_text(text)
        assert main(["families", "--families-dir", str(tmp_path / "families")]) == 0, \
            f"{where}, a family file: {capsys.readouterr().err}"
        return
    if marker is None:
        config = snippet
    else:
        source = REPO_ROOT / marker.group("path")
        assert source.is_file(), f"{where} names {marker.group('path')}, which is no file of the repository"
        base = yaml.safe_load(source.read_text())
        if marker.group("kind") == "from":
            for key_path, value in leaves(snippet):
                actual = base
                for key in key_path:
                    actual = actual.get(key) if isinstance(actual, dict) else None
                assert actual == value, (f"{where} says {'.'.join(map(str, key_path))}: {value!r}; "
                                         f"{marker.group('path')} says {actual!r}")
            config = base
        else:
            config = merged(base, snippet)
    problem = check_config(with_reader_folders(config, tmp_path), tmp_path, capsys)
    hint = "" if marker else " (a fragment? mark its first line `# added to config/config.yaml`)"
    assert problem == "", f"{where} does not validate{hint}: {problem}"


# --- SQL -----------------------------------------------------------------------------------------------------------

def readme_sql_blocks() -> list[str]:
    return [body for lang, body in fenced_blocks(REPO_ROOT / "README.md") if lang == "sql"]


def qtraj_invocations(command: str) -> list[list[str]]:
    """The arguments of every `qtraj` call in a shell command (after `qtraj`, up to a pipe or the command's end)."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:  # not shell (a prose code span with an apostrophe): its words as they are
        words = command.split()
    calls = []
    for index, word in enumerate(words):
        if word == "qtraj" or word.endswith("/qtraj"):
            arguments, optional = [], 0  # inside [...] of a usage line, `|` separates alternatives
            for argument in words[index + 1:]:
                if optional == 0 and argument in ("|", "/", "&&", "||", ";", ">", ">>"):
                    break
                optional += argument.count("[") - argument.count("]")
                arguments.append(argument)
            calls.append(arguments)
    return calls


def doc_queries() -> list[tuple[str, str]]:
    """(where, SQL) of every `qtraj query` the docs show and every inline `SELECT …`."""
    queries = []
    for document in DOCUMENTS:
        for command in shell_commands(document):
            if command.upper().startswith("SELECT "):
                queries.append((relative(document), command))
            for arguments in qtraj_invocations(command):
                if arguments[:1] == ["query"] and any(re.match(r"\s*SELECT\b", word, re.I) for word in arguments):
                    queries.append((relative(document), build_parser().parse_args(arguments).sql))
    return queries


@pytest.mark.parametrize("sql", readme_sql_blocks())
def test_every_sql_block_of_the_readme_answers_on_the_snapshot(sql):
    assert query(sql, SNAPSHOT), f"no rows on {relative(SNAPSHOT)}:\n{sql}"


def test_every_query_the_docs_show_runs_on_the_snapshot():
    """Against the default run's dataset whatever results directory the doc names: the same tables and views, so a
    misspelt column or view fails here (an empty answer is fine: the real-weights tables are not in the snapshot)."""
    queries = doc_queries()
    assert len(queries) >= 5, queries
    for where, sql in queries:
        try:
            query(sql, SNAPSHOT)
        except Exception as error:
            pytest.fail(f"{where}: {type(error).__name__}: {error}\n{sql}")


# --- flags ---------------------------------------------------------------------------------------------------------

def subcommand_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(action.choices for action in parser._actions if isinstance(action, argparse._SubParsersAction))


def test_every_qtraj_flag_the_docs_show_exists():
    parser = build_parser()
    commands = subcommand_parsers(parser)
    problems, seen = [], 0
    for document in DOCUMENTS:
        for command in shell_commands(document):
            for arguments in qtraj_invocations(command):
                if not arguments or not re.fullmatch(r"[a-z-]+", arguments[0].lstrip("-")):
                    continue  # prose: `qtraj`'s own name
                name = arguments[0]
                target = parser if name.startswith("--") else commands.get(name)
                if target is None:
                    problems.append(f"{relative(document)}: `qtraj {name}` is no command ({', '.join(commands)})")
                    continue
                for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", " ".join(arguments)):
                    seen += 1
                    if flag not in target._option_string_actions:
                        problems.append(f"{relative(document)}: `qtraj {name}` has no {flag}: {command[:100]}")
    assert seen >= 10 and problems == []


# --- links and paths -----------------------------------------------------------------------------------------------

def anchors(document: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    headings = re.findall(r"^#+\s+(.*?)\s*$", FENCE.sub("", document.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_every_relative_link_of_the_docs_leads_to_a_file_of_the_repository():
    problems, seen = [], 0
    for document in DOCUMENTS:
        for match in LINK.finditer(FENCE.sub("", document.read_text())):
            target = match.group("target")
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            seen += 1
            path, _, anchor = target.partition("#")
            resolved = (document.parent / path).resolve() if path else document
            if not resolved.is_relative_to(REPO_ROOT) or not resolved.exists():
                problems.append(f"{relative(document)}: {target} is no file of the repository")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                problems.append(f"{relative(document)}: {target}: {relative(resolved)} has no heading #{anchor}")
    assert seen >= 10 and problems == []


# top-level folders of the repository whose files docs name in backticks (results/ and models/ are made by runs)
REPOSITORY_FOLDERS = ("bench", "config", "data", "docs", "envs", "profiles", "report", "rules", "scripts", "src",
                      "tests")


def test_every_repository_path_the_docs_name_exists():
    problems, seen = [], 0
    for document in DOCUMENTS:
        for span in code_spans(document) + [body for _, body in fenced_blocks(document)]:
            for path in re.findall(r"(?<![\w./-])(?:\.\./)?(?:[\w.-]+/)+[\w.+-]*", span):
                if path.split("/")[0].lstrip(".") not in REPOSITORY_FOLDERS and not path.startswith("../"):
                    continue
                if re.search(r"[<>{}*…]|\.\.\.", path) or path.startswith("../../"):
                    continue  # a pattern, not a file
                seen += 1
                if not any((base / path.rstrip("/")).exists() for base in (REPO_ROOT, document.parent)):
                    problems.append(f"{relative(document)}: {path} does not exist")
    assert seen >= 20 and problems == []


def test_the_experiments_table_lists_every_experiment_config():
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Controlled experiments", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([\w.-]+\.yaml)`", section, re.M))
    assert listed == {path.name for path in (REPO_ROOT / "config" / "experiments").glob("*.yaml")}


# --- figures in prose ----------------------------------------------------------------------------------------------

def test_the_measured_prose_figures_are_the_snapshots():
    """docs/measured.md's accuracy standard errors and GPTQ-against-RTN counts, recomputed on the snapshot."""
    text = " ".join((REPO_ROOT / "docs" / "measured.md").read_text().split())
    stderr = {row["task"]: row for row in query(
        "SELECT task, count(*) AS models, round(avg(stderr), 3) AS mean FROM accuracy WHERE metric = 'acc' "
        "GROUP BY task", SNAPSHOT)}
    assert (f"averaged over the {stderr['continuation']['models']} fp and quantized models, is "
            f"±{stderr['continuation']['mean']:.3f} (continuation) and ±{stderr['word-order']['mean']:.3f} "
            "(word order)") in text
    losses = {row["bits"]: row for row in query(
        "SELECT g.bits, count(*) AS n, count(*) FILTER (g.loss_q < r.loss_q) AS below FROM results g "
        "JOIN results r USING (run, checkpoint) WHERE g.method = 'gptq' AND r.method = 'rtn' AND g.bits = r.bits "
        "AND g.group_size = r.group_size GROUP BY ALL", SNAPSHOT)}
    assert (f"GPTQ's loss is below RTN's on {losses[3]['below']} of {losses[3]['n']} checkpoints at 3 bits and "
            f"{losses[4]['below']} of {losses[4]['n']} at 4 bits") in text
    [layers] = query(
        "SELECT count(*) AS n, count(DISTINCT layer) AS per_checkpoint, "
        "count(*) FILTER (g.recon_error < r.recon_error) AS recon_below, "
        "count(*) FILTER (g.weight_error > r.weight_error) AS weight_above FROM layer_errors g "
        "JOIN layer_errors r USING (run, checkpoint, layer) WHERE g.method = 'gptq' AND r.method = 'rtn' "
        "AND g.bits = r.bits AND g.group_size = r.group_size GROUP BY g.bits HAVING g.bits = 3", SNAPSHOT)
    n = layers["n"]
    assert layers["recon_below"] == layers["weight_above"] == n  # what "all" says; each width
    assert (f"RTN's on all {n} weight matrices ({layers['per_checkpoint']} per checkpoint) at each width, while its "
            f"weight error is larger on all {n}") in text
