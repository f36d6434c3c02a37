"""An export folder's model code is the package's, generated: self-contained, line for line, loud on failure."""

from __future__ import annotations

import ast
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from archquant.core.linears import LINEARS
from archquant.export.remote_code import packed_linear
from archquant.export.remote_code.render import RemoteCodeError, inline_sources, modeling_source
from archquant.models import hetero


def _top_level_sources(module) -> list[str]:
    text = Path(module.__file__).read_text()
    tree = ast.parse(text)
    return [ast.get_source_segment(text, n, padded=True) for n in tree.body
            if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Assign))]


def test_generated_code_imports_only_torch_and_transformers():
    tree = ast.parse(modeling_source())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {r for r in roots if r not in sys.stdlib_module_names} == {"torch", "transformers"}


def test_generated_code_is_the_package_code_line_for_line():
    text = modeling_source()
    for module in (hetero, packed_linear):
        for segment in _top_level_sources(module):
            assert segment in text, segment.splitlines()[0]
    # the one linear map is written out as its value
    assign = next(n for n in ast.parse(text).body if isinstance(n, ast.Assign) and n.targets[0].id == "LINEARS")
    assert ast.literal_eval(assign.value) == LINEARS


def test_generated_model_is_built_on_packed_linears():
    mod = types.ModuleType("modeling_archquant_under_test")
    sys.modules[mod.__name__] = mod  # dataclass-style configs look their module up while the class is created
    try:
        exec(compile(modeling_source(), "modeling_archquant.py", "exec"), mod.__dict__)
        cfg = mod.ArchQuantConfig(vocab_size=64, hidden_size=32, head_dim=16, layer_num_heads=[2, 1],
                                  layer_num_kv_heads=[1, 1], layer_head_dim=[16, 8], layer_intermediate_size=[48, 32],
                                  quant={"group_size": 16, "lm_head_bits": 4,
                                         "layers": [{"wbits": {k: 4 for k in LINEARS}, "abits": 8},
                                                    {"wbits": {k: 16 for k in LINEARS}, "abits": 16}]})
        model = mod.ArchQuantForCausalLM(cfg)
    finally:
        del sys.modules[mod.__name__]
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "PackedLinear"
    assert model.model.layers[0].mlp.down_proj.wbits == 4 and model.lm_head.wbits == 4
    with pytest.raises(ValueError, match="ArchQuantConfig.layer_head_dim must list 2 values"):  # hetero's validation
        mod.ArchQuantConfig(layer_num_heads=[2, 2], layer_num_kv_heads=[1, 1], layer_head_dim=[16],
                            layer_intermediate_size=[8, 8])
    assert model(input_ids=torch.zeros(1, 3, dtype=torch.long)).logits.shape == (1, 3, 64)


_MAIN = textwrap.dedent('''
    """Main module."""

    from __future__ import annotations

    import math
    from archquant.fake.consts import NAMES
    from archquant.fake.impl import helper


    # a comment kept with the body
    def main():
        return helper(math.pi), NAMES
''')
_STAND_IN = textwrap.dedent('''
    """The stand-in."""
    import math
    from os import path


    def helper(x):
        return path.join(str(x))
''')


def _constant(module: str, name: str):
    return {("archquant.fake.consts", "NAMES"): ("a", "b"), ("archquant.fake.consts", "OBJ"): object()}[module, name]


def _inline(main: str, stand_in: str = _STAND_IN) -> str:
    return inline_sources("archquant.fake.main", main, {"archquant.fake.impl": stand_in}, _constant, '"""Header."""')


def test_inlining_serves_stand_ins_writes_constants_and_merges_imports():
    text = _inline(_MAIN)
    ns: dict = {}
    exec(compile(text, "generated.py", "exec"), ns)
    assert ns["main"]() == (str(3.141592653589793), ("a", "b"))
    assert text.startswith('"""Header."""\n\nfrom __future__ import annotations\n')
    assert text.count("import math") == 1 and "archquant" not in text.replace('"""Header."""', "")
    assert "# a comment kept with the body\ndef main():" in text
    assert text.index("def helper") < text.index("def main")


@pytest.mark.parametrize("main,stand_in,message", [
    (_MAIN.replace("import NAMES", "import OBJ"), _STAND_IN, "only literal constants"),
    (_MAIN.replace("import helper", "import helper2"), _STAND_IN, "its stand-in does not define"),
    (_MAIN + "\n\ndef late():\n    from archquant.fake import x\n", _STAND_IN, "imported below the top-level imports"),
    (_MAIN, _STAND_IN + "\n\ndef main():\n    pass\n", "'main' is defined by both"),
    (_MAIN.replace("import math", "import archquant.fake"), _STAND_IN, "use 'from ... import NAME'"),
])
def test_what_cannot_be_inlined_fails_at_export_time(main, stand_in, message):
    with pytest.raises(RemoteCodeError, match=message):
        _inline(main, stand_in)
