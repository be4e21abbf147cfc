"""The pre-pass (torch_metal_fused/emulator/prepass.py) rejects instantiation lines that Apple's compiler rejects
or that would register the wrong kernel under a host name, with the .metal file and line. Pure Python: no clang
needed."""

import re
from pathlib import Path

import pytest

from torch_metal_fused.emulator.build import SHADERS, generate
from torch_metal_fused.emulator.prepass import PrepassError, prepass

REPO = Path(__file__).resolve().parents[1]

KERNEL = """#include <metal_stdlib>
using namespace metal;

template <typename T, bool kWeight>
[[kernel]] void scale(device T* x [[buffer(0)]], uint gid [[thread_position_in_grid]]) {
  x[gid] = kWeight ? x[gid] * T(2) : x[gid];
}

[[kernel]] void plain(device float* x [[buffer(0)]], uint gid [[thread_position_in_grid]]) {
  x[gid] = 0.0f;
}

"""
FIRST_LINE = KERNEL.count("\n") + 1  # the line of the first instantiation appended to KERNEL


def _inst(host: str, decl: str, declared: str | None = None) -> str:
    return f'template [[host_name("{host}")]] [[kernel]] decltype({decl}) {declared or decl};\n'


def _prepass(tmp_path: Path, *lines: str):
    src = tmp_path / "planted.metal"
    src.write_text(KERNEL + "".join(lines))
    return src, prepass(src)


def _rejected(tmp_path: Path, *lines: str) -> tuple[Path, str]:
    src = tmp_path / "planted.metal"
    src.write_text(KERNEL + "".join(lines))
    with pytest.raises(PrepassError) as exc:
        prepass(src)
    return src, str(exc.value)


def test_correct_instantiations_are_accepted(tmp_path):
    _, result = _prepass(
        tmp_path,
        _inst("scale_float", "scale<float, true>"),
        _inst("scale_noweight_half", "scale<half,false>", "scale< half , false >"),  # spacing may differ
        _inst("scale_bfloat", "scale<bfloat, true>"),
        # an element type that is not a dtype: the suffix rule does not apply (tests/emulator_shaders/)
        _inst("scale_uint", "scale<uint, true>"),
    )
    assert result.host_names == ["scale_float", "scale_noweight_half", "scale_bfloat", "scale_uint", "plain"]
    assert 'TMF_INSTANTIATE("scale_bfloat", scale, scale<bfloat, true>)' in result.source
    body = result.source.split("\n", 1)[1]  # after `#line 1 "<file>"`: the .metal file's lines, line for line
    assert body.split("\n")[FIRST_LINE + 1].startswith('TMF_INSTANTIATE("scale_bfloat", ')


def test_decltype_of_another_specialisation_is_rejected(tmp_path):
    src, msg = _rejected(
        tmp_path,
        _inst("scale_float", "scale<float, true>"),
        _inst("scale_bfloat", "scale<half, true>", "scale<bfloat, true>"),
    )
    assert f"{src}:{FIRST_LINE + 1}:" in msg
    assert "decltype(scale<half, true>)" in msg and "scale<bfloat, true>" in msg


def test_decltype_with_other_non_type_argument_is_rejected(tmp_path):
    src, msg = _rejected(tmp_path, _inst("scale_float", "scale<float, true>", "scale<float, false>"))
    assert f"{src}:{FIRST_LINE}:" in msg and "another specialisation" in msg


def test_decltype_of_another_template_is_rejected(tmp_path):
    src, msg = _rejected(tmp_path, _inst("scale_float", "scale<float, true>", "other<float, true>"))
    assert f"{src}:{FIRST_LINE}:" in msg and "another specialisation" in msg


def test_duplicate_host_name_is_rejected(tmp_path):
    src, msg = _rejected(
        tmp_path,
        _inst("scale_float", "scale<float, true>"),
        _inst("scale_half", "scale<half, true>"),
        _inst("scale_float", "scale<float, false>"),
    )
    assert f"{src}:{FIRST_LINE + 2}:" in msg
    assert "'scale_float' registered twice" in msg and f"first at {src}:{FIRST_LINE}" in msg


def test_host_name_equal_to_a_plain_kernel_is_rejected(tmp_path):
    # `plain` is registered under its own name at the end of the file: another registration of it is a duplicate.
    src, msg = _rejected(tmp_path, _inst("plain", "scale<uint, true>"))
    assert "'plain' registered twice" in msg and f"{src}:{FIRST_LINE}" in msg


@pytest.mark.parametrize(
    ("host", "decl", "wanted"),
    [
        ("scale_half", "scale<bfloat, true>", "end with _bfloat"),  # the planted bfloat16-only slip
        ("scale_bfloat", "scale<float, true>", "end with _float"),
        ("scale_float", "scale<half, true>", "end with _half"),
        ("scale", "scale<float, true>", "end with _float"),  # a dtype instantiation needs its suffix
        ("scale_float_v2", "scale<float, true>", "end with _float"),
        ("scale_float", "scale<uint, true>", "not end with a dtype suffix"),
    ],
)
def test_dtype_suffix_must_match_the_first_template_argument(tmp_path, host, decl, wanted):
    src, msg = _rejected(tmp_path, _inst(host, decl))
    assert f"{src}:{FIRST_LINE}:" in msg and f"host name {host!r}" in msg and wanted in msg


def test_host_name_in_an_unknown_form_is_rejected(tmp_path):
    # An explicit instantiation without decltype would compile but never be registered.
    line = 'template [[host_name("scale_float")]] [[kernel]] void scale<float, true>(device float*, uint);\n'
    src, msg = _rejected(tmp_path, "// [[host_name(...)]] in a comment is fine\n", line)
    assert f"{src}:{FIRST_LINE + 1}:" in msg and "outside an instantiation" in msg


def test_multi_line_instantiation_reports_its_first_line(tmp_path):
    src, msg = _rejected(
        tmp_path,
        '\ntemplate [[host_name("scale_half")]] [[kernel]]\n    decltype(scale<half, true>) scale<half, false>;\n',
    )
    assert f"{src}:{FIRST_LINE + 1}:" in msg


def test_the_planted_real_kernel_slip_surfaces_through_the_build(tmp_path):
    # The brief's example on a copy of the real rms_norm.metal: decltype names the half kernel, the declaration
    # the bfloat one. generate() is the build's first step (compile_libraries, ensure_built, lint_address_spaces).
    good = (
        'template [[host_name("rms_norm_forward_single_row_bfloat")]] [[kernel]] '
        "decltype(rms_norm_forward_single_row<bfloat, true, false>) rms_norm_forward_single_row<bfloat, true, false>;"
    )
    text = (SHADERS / "rms_norm.metal").read_text()
    assert text.count(good) == 1
    line = text.count("\n", 0, text.index(good)) + 1
    src = tmp_path / "rms_norm.metal"
    src.write_text(
        text.replace(
            good,
            good.replace("decltype(rms_norm_forward_single_row<bfloat", "decltype(rms_norm_forward_single_row<half"),
        )
    )
    with pytest.raises(PrepassError, match=re.escape(f"{src}:{line}:")):
        generate(tmp_path / "gen", [src])


@pytest.mark.parametrize(
    "path",
    [*sorted(SHADERS.glob("*.metal")), *sorted((REPO / "tests" / "emulator_shaders").glob("*.metal"))],
    ids=lambda p: p.name,
)
def test_every_existing_shader_satisfies_the_rules(path):
    # The suffix rule is only enforced because every existing instantiation already satisfies it.
    assert prepass(path).host_names


def test_a_host_name_defined_in_two_files_is_rejected(tmp_path):
    from torch_metal_fused.emulator import build

    kernel = "#include <metal_stdlib>\n[[kernel]] void same_name(device float* x [[buffer(0)]]) {}\n"
    for name in ("a.metal", "b.metal"):
        (tmp_path / name).write_text(kernel)
    with pytest.raises(build.ShaderCompileError, match=r"'same_name' is also defined in .*a\.metal"):
        build.generate(tmp_path / "gen", [tmp_path / "a.metal", tmp_path / "b.metal"])


POSITIONS = """#include <metal_stdlib>
using namespace metal;

[[kernel]] void k(device float* x [[buffer(0)]],
                  {group} group [[threadgroup_position_in_grid]],
                  {tid} tid [[thread_position_in_threadgroup]],
                  uint lane [[thread_index_in_simdgroup]]) {{
  x[0] = 0.0f;
}}
"""


@pytest.mark.parametrize(
    "group, tid, ok",
    [
        ("uint", "uint", True),
        ("uint2", "uint2", True),
        ("ushort3", "ushort3", True),
        ("uint2", "uint", False),
        ("uint", "uint3", False),
        ("uint2", "uint3", False),
    ],
)
def test_position_attributes_must_be_all_scalars_or_all_vectors_of_one_width(tmp_path, group, tid, ok):
    """Apple's compiler rejects a kernel whose position attributes mix scalars and vectors (the LoRA expand kernels
    did: `uint2 group` beside `uint tid`), clang does not: the pre-pass must. SIMD-group indices are exempt."""
    src = tmp_path / "positions.metal"
    src.write_text(POSITIONS.format(group=group, tid=tid))
    if ok:
        prepass(src)
        return
    with pytest.raises(PrepassError, match=r"positions\.metal:4: kernel k mixes scalar and vector"):
        prepass(src)


MSL_RULES = """#include <metal_stdlib>
using namespace metal;

[[kernel]] void k(device float* x [[buffer(0)]], uint i [[thread_position_in_grid]]) {{
  {body}
}}
{tail}"""


@pytest.mark.parametrize(
    "body, tail, message",
    [
        ("x[i] = std::max(x[i], 0.0f);", "", r"k\.metal:5: 'std::' is C\+\+"),
        ("if (i > 9) { throw 1; }", "", r"k\.metal:5: 'throw' is C\+\+"),
        ("device float* p = new float[4];", "", r"k\.metal:5: 'new' is C\+\+"),
        ("x[i] = float(bfloat(x[i]));", "", r"k\.metal:5: bfloat outside"),
        ("x[i] = x[i] * 0.5;", "", r"k\.metal:5: '0\.5' is a double"),
        ("x[i] = x[i] + 1e-6;", "", r"k\.metal:5: '1e-6' is a double"),
        ("double d = x[i];", "", r"k\.metal:5: 'double' is a double"),
        ("", "template <typename T> void f(device T* p) {}\ntemplate void f<bfloat>(device bfloat*);\n", ":8: bfloat"),
        (
            "",
            "[[kernel]] void g(float* y [[buffer(0)]]) {}\n",
            r"k\.metal:7: 'float\* y \[\[buffer\(0\)\]\]' .*address",
        ),
        ("", "[[kernel]] void g(thread float* y [[buffer(1)]]) {}\n", r"needs the device or constant"),
        ("", "[[kernel]] void g(device float* y [[buffer(31)]]) {}\n", r"buffer indices 0-30"),
    ],
)
def test_msl_rules_clang_does_not_enforce(tmp_path, body, tail, message):
    """Planted violations of MSL rules that the harness's clang accepts: each is rejected with file:line."""
    src = tmp_path / "k.metal"
    src.write_text(MSL_RULES.format(body=body, tail=tail))
    with pytest.raises(PrepassError, match=message):
        prepass(src, msl_subset=True)


def test_msl_rules_accept_what_msl_allows(tmp_path):
    """bfloat inside the guard (and nested #if within it), words in comments and strings, constant buffers."""
    src = tmp_path / "k.metal"
    src.write_text(
        MSL_RULES.format(
            body="x[i] = 1.0f + 2.5e-3f + half(0.5h) + 3;  // std::max, throw, new, bfloat, 0.5 in a comment are fine",
            tail=(
                "[[kernel]] void c(constant float& s [[buffer(30)]], device float* y [[buffer(1)]]) { y[0] = s; }\n"
                "#if defined(__HAVE_BFLOAT__)\n#if 1\n"
                "[[kernel]] void b(device bfloat* y [[buffer(0)]]) { y[0] = bfloat(1.0f); }\n#endif\n#else\n"
                "/* no bfloat */\n#endif\n"
            ),
        )
    )
    assert set(prepass(src, msl_subset=True).kernels) == {"k", "c", "b"}


def test_the_msl_rules_apply_to_the_shipped_shaders_by_default():
    from torch_metal_fused.emulator.prepass import SHIPPED_SHADERS

    assert SHIPPED_SHADERS == SHADERS.resolve()


# The shaders' own headers and the argument structs they share with the host launch code.
SHADER_HEADERS = [*sorted(SHADERS.glob("*.h")), SHADERS.parent / "csrc" / "include" / "tmf" / "shader_args.h"]


@pytest.mark.parametrize("header", SHADER_HEADERS, ids=lambda p: p.name)
def test_shared_shader_headers_satisfy_the_msl_rules(header):
    from torch_metal_fused.emulator.prepass import _check_msl_subset

    _check_msl_subset(header.read_text(), header.name)
