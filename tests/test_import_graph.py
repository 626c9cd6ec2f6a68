"""The library's imports run one way (docs/design.md, Layout): rules checked on the source."""

import subprocess
import sys

import import_graph

# Units only the top of the stack may import: the config factory, the stages, the sweep.
TOP = {'configlib', 'stages', 'sweep'}


def test_no_import_cycles_between_packages():
    assert import_graph.cycles(import_graph.unit_edges()) == []


def test_cycle_finder_finds_a_cycle():
    graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}
    assert import_graph.cycles(graph) == [['a', 'b', 'c']]


def test_library_takes_values_not_the_config_factory_or_the_stages():
    graph = import_graph.unit_edges()
    offenders = {unit: sorted(imported & TOP) for unit, imported in graph.items()
                 if unit not in TOP and imported & TOP}
    assert offenders == {}


def test_training_never_imports_export():
    assert 'export' not in import_graph.unit_edges()['train']


def test_reading_the_config_does_not_load_the_demo_generator():
    code = ('import sys; from vise_jax import configlib; configlib.default_config(); '
            "print(sorted(m for m in sys.modules if m.startswith('vise_jax.demo.') "
            "or m == 'PIL.ImageDraw'))")
    loaded = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert loaded == "['vise_jax.demo.spec']"
