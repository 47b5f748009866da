"""dvc.yaml's `params` of each stage are exactly the params groups the stage reads when it runs, in its own script or
in the library code it calls (test_stage_deps.py reads the scripts only). Each stage of dvc.yaml runs here, in a tiny
project (tests/pipeline.py), with a sitecustomize.py that wraps qlora_nli.config.load_params: the params it returns
note every group read (`params["train"]`) and every key of a group read (`params["train"]["seed"]`, or all of a
group's keys when the group is iterated, copied or serialised), in a JSON file per process."""
import json
import os
import sys
import textwrap

import pytest
import yaml
from pipeline import REPO, make_project, run

pytestmark = pytest.mark.slow  # runs every stage of the pipeline, each in a subprocess

# Written into a directory put first on PYTHONPATH: Python imports it at startup, before the stage's module, so the
# stage's `from qlora_nli.config import load_params` already finds the wrapper. The project directory follows on
# PYTHONPATH, so qlora_nli is the project's copy.
SITECUSTOMIZE = textwrap.dedent('''
    import atexit
    import json
    import os
    import sys

    import yaml

    import qlora_nli.config as config

    LOG_DIR = os.environ["PARAMS_READ_LOG"]
    READ = set()
    CALLS = []


    def write():
        path = os.path.join(LOG_DIR, f"{os.getpid()}.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"argv": sys.argv, "load_params_calls": len(CALLS), "read": sorted(READ)}, f)
        os.replace(path + ".tmp", path)


    def note(*names):
        if not READ.issuperset(names):
            READ.update(names)
            write()  # at once too, not only at exit: a process that ends by os._exit keeps what it read


    class Recorded(dict):
        """params (prefix "") or one group of them (prefix "group."): notes the name of each entry read."""

        def __init__(self, data, prefix=""):
            super().__init__(data)
            self.prefix = prefix

        def __getitem__(self, key):
            note(self.prefix + str(key))
            return super().__getitem__(key)

        def get(self, key, default=None):
            note(self.prefix + str(key))
            return super().get(key, default)

        def _all(self):
            note(*(self.prefix + str(key) for key in self.keys()))

        def items(self):
            self._all()
            return super().items()

        def values(self):
            self._all()
            return super().values()

        def copy(self):
            self._all()
            return super().copy()

        def __iter__(self):  # defined, so that dict(r) and {**r} read each entry through __getitem__
            return super().__iter__()


    # a group dumped to YAML as a plain dict would be (yaml's safe dumper knows dict, not its subclasses)
    yaml.SafeDumper.add_representer(Recorded, yaml.representer.SafeRepresenter.represent_dict)
    load_params_unwrapped = config.load_params


    def load_params(*args, **kwargs):
        CALLS.append(1)
        params = load_params_unwrapped(*args, **kwargs)
        return Recorded({group: Recorded(value, group + ".") if isinstance(value, dict) else value
                         for group, value in dict.items(params)})


    config.load_params = load_params
    write()
    atexit.register(write)
''')


def _dvc_stages(dvc_yaml):
    """(name as DVC names it, command, declared params) for every stage, foreach stages once per key, in file order."""
    for name, stage in yaml.safe_load(dvc_yaml.read_text())["stages"].items():
        if "foreach" in stage:
            for key in stage["foreach"]:
                yield f"{name}@{key}", stage["do"]["cmd"].replace("${key}", key), stage["do"].get("params", [])
        else:
            yield name, stage["cmd"], stage.get("params", [])


@pytest.fixture(scope="module")
def stage_reads(tmp_path_factory):
    """Every stage run in dvc.yaml's order: {stage: (declared params, load_params calls, names read)}."""
    base = tmp_path_factory.mktemp("params-read")
    root = make_project(base / "project")
    hook = base / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    reads = {}
    for name, cmd, declared in _dvc_stages(root / "dvc.yaml"):
        words = cmd.split()
        assert words[:3] == ["python", "-m", words[2]] and words[2].startswith("stages."), cmd
        log = base / "reads" / name
        log.mkdir(parents=True)
        run([sys.executable, *words[1:]], root,
            extra_env={"PYTHONPATH": f"{hook}{os.pathsep}{root}", "PARAMS_READ_LOG": str(log)})
        records = [json.loads(p.read_text()) for p in log.glob("*.json")]
        assert records, f"{name}: no process wrote what it read: was {hook}/sitecustomize.py imported?"
        reads[name] = (declared, sum(r["load_params_calls"] for r in records),
                       set().union(*(r["read"] for r in records)))
    return reads


STAGES = [name for name, _, _ in _dvc_stages(REPO / "dvc.yaml")]


def test_every_stage_of_the_pipeline_is_checked():
    assert STAGES == ["check_params", "prepare", "finetune", "evaluate@baseline", "evaluate@finetuned",
                      "failure_cases", "report"]


@pytest.mark.parametrize("name", STAGES)
def test_params_read_are_those_declared(stage_reads, name):
    declared, calls, read = stage_reads[name]
    assert calls >= 1, f"{name}: never called load_params"
    groups = {entry for entry in read if "." not in entry}
    keys = read - groups
    if declared == [{"params.yaml": None}]:  # the whole file (check_params: it checks every param)
        assert name == "check_params", f"{name}: only check_params declares all of params.yaml"
        assert {"data", "model", "compute"} <= groups, f"{name}: the recording saw no reads ({sorted(read)})"
        return
    assert all(isinstance(entry, str) for entry in declared), declared
    declared_groups = {entry for entry in declared if "." not in entry}
    declared_keys = set(declared) - declared_groups
    for group in sorted(groups):
        of_group = sorted(key for key in keys if key.startswith(group + "."))
        assert group in declared_groups | {key.split(".")[0] for key in declared_keys}, \
            f"{name}: reads params group {group!r} (keys read: {of_group}) but dvc.yaml declares {declared}"
    for key in sorted(keys):
        assert key.split(".")[0] in declared_groups or key in declared_keys, \
            f"{name}: reads {key} but dvc.yaml declares neither {key.split('.')[0]} nor {key} ({declared})"
    for group in sorted(declared_groups):
        assert group in groups, f"{name}: dvc.yaml declares params {group!r}, which the stage never reads"
    for key in sorted(declared_keys):
        assert key in keys, f"{name}: dvc.yaml declares params {key!r}, which the stage never reads"
