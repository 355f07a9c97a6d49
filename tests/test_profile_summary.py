"""benchmarks/profile_summary.py: the profile's kernels grouped by kind, and the GPU's idle time."""
import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from profile_summary import kind_of, summarize  # noqa: E402


def test_kernel_names_land_in_their_kind():
    assert kind_of("_ZN7cutlass13device_kernelIN2at4cuda6detail25enable_3x_kernel_for_sm9xINS_4gemm6kernel13"
                   "GemmUniversalINS5_17GroupProblemShapeIN4cute5tupleIJiiiEEEEENS") == "grouped GEMM (experts, bf16)"
    assert kind_of("nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_TNT") == "GEMM (bf16 tensor cores)"
    assert kind_of("sm80_xmma_gemm_f32f32_f32f32_f32_tn_n_tilesize128x32x8") == "fp32 GEMM (CUDA cores)"
    assert kind_of("triton_poi_fused__grouped_mm__to_copy_cat_clamp") == "Inductor fused (Triton)"
    assert kind_of("_bwd_kernel") == "dsv4 attention (Triton)"
    assert kind_of("_pre_bwd") == "dsv4 mHC (Triton)"
    assert kind_of("_scores_kernel") == "dsv4 indexer (Triton)"
    assert kind_of("void at::native::vectorized_elementwise_kernel<8>") == "ATen other"


def test_busy_counts_overlaps_once_and_idle_is_the_rest(tmp_path):
    # kernels at [0, 10) and [5, 20) on two streams overlap; [30, 40) follows a 10 us gap
    events = [{"ph": "X", "cat": "kernel", "name": n, "ts": ts, "dur": d}
              for n, ts, d in [("_fwd_kernel", 0, 10), ("triton_red_fused_0", 5, 15), ("_ce_kernel", 30, 10)]]
    events.append({"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 100})   # host side: ignored
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    s = summarize(path)
    assert s["window_ms"] == 0.040 and abs(s["busy_ms"] - 0.030) < 1e-12 and abs(s["idle_ms"] - 0.010) < 1e-12
    assert s["launches"] == 3 and abs(s["kernel_ms"] - 0.035) < 1e-12
    assert {k: v["ms"] for k, v in s["kinds"].items()} == {
        "Inductor fused (Triton)": 0.015, "dsv4 attention (Triton)": 0.010, "dsv4 head loss (Triton)": 0.010}
