"""Milestones: minidiff passes its own checklist, planted bugs are caught with pointed messages, and a student's
function is found from the command line or from Python.

The references with a student's signature (ddim_step, add_noise, pred_eps, resblock) are checked here against the
library code they restate, so that a milestone cannot pass a wrong formula. Tolerances: fp32 unless stated.
"""

import math
import textwrap

import pytest
import torch

from minidiff.cli import main as cli_main
from minidiff.course.gaussian import GaussianEpsModel
from minidiff.course.milestones import MILESTONES, Tolerance, check, compare, load_candidate, run
from minidiff.course.milestones.formulas import add_noise, ddim_step, pred_eps
from minidiff.course.milestones.networks import _tokenizer, tokenize
from minidiff.errors import MinidiffError
from minidiff.samplers import sample
from minidiff.schedule import NoiseSchedule
from minidiff.unet import UNet, timestep_embedding

FAST_MODULES = ["betas", "alphas_cumprod", "add_noise", "pred_x0", "pred_eps", "ddpm_step", "ddim_step", "timesteps",
                "euler_step", "dpmpp_2m_step", "timestep_embedding", "attention", "resblock", "guided_eps",
                "diffusion_loss", "unet", "vae", "scale_latents", "decode_latents", "tokenizer", "text_encoder",
                "load_unet", "blend_latents"]


def failure(name, candidate) -> str:
    result = check(name, candidate)
    assert result.status == "fail", f"the planted bug passed {name}: {result}"
    assert not result
    return result.detail


# --- minidiff passes, and its references restate the library -----------------------------------------------


@pytest.mark.parametrize("name", FAST_MODULES + ["ddim_50", "dpmpp_20", "attention_kernels", "half_precision"])
def test_minidiff_passes_its_own_milestones(name):
    result = check(name)
    assert result.status == "pass", str(result)


def test_the_checklist_has_every_milestone_of_the_course():
    assert list(MILESTONES)[:7] == ["ddim_50", "dpmpp_20", "compile", "half_precision", "attention_kernels",
                                    "bench", "realtime"]
    assert set(FAST_MODULES) <= set(MILESTONES)
    for milestone in MILESTONES.values():  # every docstring starts with the signature a candidate must have
        assert ("->" in milestone.signature) == milestone.takes_candidate, milestone.name


def test_reference_ddim_step_is_the_ddim_sampler():
    """50 steps of milestones' ddim_step reproduce minidiff.sample("ddim") on the Gaussian model (fp32, 1e-6)."""
    model, schedule = GaussianEpsModel(), NoiseSchedule.sd()
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x = noise
    timesteps, previous = schedule.ddim_timesteps(50)
    for t, t_prev in zip(timesteps.tolist(), previous.tolist()):
        x = ddim_step(x, model(x, t), schedule.alphas_cumprod[t], schedule.alphas_cumprod[max(t_prev, 0)])
    torch.testing.assert_close(x, sample(model, noise, "ddim", 50), atol=1e-6, rtol=1e-6)


def test_reference_add_noise_and_pred_eps_restate_the_schedule():
    schedule = NoiseSchedule.sd()
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for t in (0, 500, 999):
        a = schedule.alphas_cumprod[t]
        torch.testing.assert_close(add_noise(x0, noise, a), schedule.add_noise(x0, noise, t), atol=1e-6, rtol=1e-6)
        # v = sqrt(a) eps - sqrt(1 - a) x0 of x_t made from (x0, eps): pred_eps must give eps back
        x_t, v = add_noise(x0, noise, a), math.sqrt(a) * noise - math.sqrt(1 - a) * x0
        torch.testing.assert_close(pred_eps(v, x_t, a, "v_prediction"), noise, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pred_eps(noise, x_t, a, "epsilon"), noise)


# --- the planted bugs of the brief, each caught with a message that points at it --------------------------


def test_latents_not_scaled_mentions_the_scaling_factor():
    message = failure("decode_latents", lambda latents, vae: ((vae.decode(latents) + 1) / 2).clamp(0, 1))
    assert "scaling factor" in message and "0.18215" in message and "hint:" in message


def test_sin_cos_swapped_mentions_the_order():
    def swapped(t, dim):
        cos, sin = timestep_embedding(t, dim).chunk(2, dim=-1)
        return torch.cat([sin, cos], dim=-1)

    message = failure("timestep_embedding", swapped)
    assert "sin and cos are swapped" in message and "flip_sin_to_cos" in message
    assert message.startswith("dim=320, element (0, 0): yours 0, reference 1,")  # t = 0: sin 0 where cos 1


def test_eps_used_for_a_v_prediction_model_mentions_the_prediction_type():
    message = failure("pred_eps", lambda output, x_t, alpha_bar_t, prediction_type: output)
    assert message.startswith("v_prediction, t=999")  # epsilon passes: the first failure is the first v case
    assert "prediction type is 'v_prediction'" in message


def test_missing_sqrt_in_ddim_mentions_sqrt_and_alpha_bar():
    def no_sqrt(x_t, eps, alpha_bar_t, alpha_bar_prev, eta=0.0, noise=None):
        pred_x0 = (x_t - torch.sqrt(1 - alpha_bar_t) * eps) / torch.sqrt(alpha_bar_t)
        return alpha_bar_prev * pred_x0 + torch.sqrt(1 - alpha_bar_prev) * eps

    message = failure("ddim_step", no_sqrt)
    assert message.startswith("step 0 (t=981), element (0, 0, 0, 0): yours")
    assert "missing sqrt" in message and "sqrt(alpha_bar_prev)" in message


def test_softmax_over_the_wrong_axis_mentions_the_axis():
    message = failure("attention", lambda q, k, v: (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(-2) @ v)
    assert "softmax over the wrong axis" in message and "dim=-1" in message


# --- more planted bugs: the hints are specific ------------------------------------------------------------


def zero_padded(text):
    ids = [49406, *_tokenizer().encode(text)[:75], 49407]
    return ids + [0] * (77 - len(ids))


@pytest.mark.parametrize("name, candidate, expected", [
    ("alphas_cumprod", lambda T, b0, b1: torch.cumprod(1 - torch.linspace(b0, b1, T, dtype=torch.float64), 0),
     "scaled_linear"),
    ("alphas_cumprod", lambda T, b0, b1: 1 - torch.linspace(b0**0.5, b1**0.5, T) ** 2, "running product"),
    ("add_noise", lambda x0, noise, a: a * x0 + (1 - a) * noise, "missing sqrt"),
    ("timestep_embedding", lambda t, dim: timestep_embedding(t, dim, freq_shift=1), "freq_shift"),
    ("attention", lambda q, k, v: (q @ k.transpose(-2, -1)).softmax(-1) @ v, "not scaled"),
    ("decode_latents", lambda latents, vae: vae.decode(latents / vae.scaling_factor), "(image + 1) / 2"),
    ("scale_latents", lambda z: z, "scaling factor, 0.18215"),
    ("scale_latents", lambda z: z / 0.18215, "decoding divides"),
    ("tokenizer", lambda text: zero_padded(text), "not with 0"),
    ("tokenizer", lambda text: (_tokenizer().encode(text) + [49407] * 77)[:77], "<|startoftext|> (49406)"),
])
def test_other_mistakes_are_named(name, candidate, expected):
    message = failure(name, candidate)
    if expected is not None:
        assert expected in message, message


def test_a_one_element_error_is_located_exactly():
    """The brief's example: the step, the timestep, the element, both values, |diff| against the tolerance."""
    schedule = NoiseSchedule.sd()

    def off_at_701(x_t, eps, alpha_bar_t, alpha_bar_prev, eta=0.0, noise=None):
        out = ddim_step(x_t, eps, alpha_bar_t, alpha_bar_prev, eta, noise)
        if float(alpha_bar_t) == float(schedule.alphas_cumprod[701]):
            out[0, 2, 5, 1] += 0.01
        return out

    message = failure("ddim_step", off_at_701)
    assert message.startswith("step 14 (t=701), element (0, 2, 5, 1): yours ")
    assert "|diff| 1.0e-02 > tolerance" in message and "(fp32)" in message and "1 of 256 elements differ" in message
    assert "hint" not in message  # no known mistake looks like this


def test_resblock_without_silu_on_the_timestep():
    from minidiff.course.milestones.formulas import resblock

    message = failure("resblock", lambda x, emb, params: resblock(x, emb, params, silu_emb=False))
    assert message.startswith("64 -> 96 channels (conv_shortcut)") and "SiLU before time_emb_proj" in message


def test_network_milestones_name_keys_and_mistakes():
    class Renamed(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.inner = UNet(config)

    message = failure("unet", Renamed)
    assert "keys are not the official ones: it lacks 684 (e.g. time_embedding.linear_1.weight" in message
    assert "has 684 others (e.g. inner.time_embedding.linear_1.weight" in message

    def sin_first(config):
        config.flip_sin_to_cos = False  # the candidate gets a copy of the config: the reference is untouched
        return UNet(config)

    assert "flip_sin_to_cos" in failure("unet", sin_first)
    assert check("unet").status == "pass"

    from minidiff.clip import CLIPTextModel

    class NoCausalMask(CLIPTextModel):
        def forward(self, ids):
            text = self.text_model
            x = text.embeddings(ids)
            for layer in text.encoder.layers:
                x = layer(x, torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool))
            return text.final_layer_norm(x)

    assert "no causal mask" in failure("text_encoder", NoCausalMask)


def test_tokenizer_reports_the_position_and_the_tokens():
    def no_lowercase_for_red(text):
        ids = tokenize(text)
        return torch.where(ids == 736, torch.tensor(1893), ids)  # 'red</w>' replaced by another token

    message = failure("tokenizer", no_lowercase_for_red)
    assert message.startswith("prompt 1 ('A Red CIRCLE, top-left!! (oil painting),'), position 2: yours 1893")
    assert "reference 736 ('red</w>')" in message and "exactly" in message


def test_loading_reports_a_tensor_that_differs():
    from minidiff.load import load_unet

    def off_by_one(folder):
        unet = load_unet(folder)
        with torch.no_grad():
            unet.conv_in.bias[3] += 1
        return unet

    message = failure("load_unet", off_by_one)
    assert message.startswith("tensor conv_in.bias, element (3,)")


# --- the messages for what is not a wrong number ---------------------------------------------------------


def test_a_function_that_raises_or_returns_the_wrong_shape():
    def raises(x_t, eps, alpha_bar_t, alpha_bar_prev, eta=0.0, noise=None):
        return x_t.view(3, -1)

    message = failure("ddim_step", raises)
    assert message.startswith("your function raised RuntimeError") and "test_milestones.py:" in message
    assert "ddim_step(x_t, eps, alpha_bar_t, alpha_bar_prev, eta=0.0, noise=None)" in message  # the signature

    message = failure("ddim_step", lambda x_t, eps, alpha_bar_t, alpha_bar_prev: ddim_step(x_t, eps, alpha_bar_t,
                                                                                         alpha_bar_prev))
    assert message.startswith("your function raised TypeError") and "unexpected keyword argument 'eta'" in message

    message = failure("add_noise", lambda x0, noise, a: x0[0])
    assert message.startswith("t=0: yours has shape (4, 8, 8), the reference (2, 4, 8, 8)")
    assert failure("add_noise", lambda x0, noise, a: "x_t").startswith("t=0: yours returned a str")


def test_compare_treats_nan_as_a_difference():
    with pytest.raises(Exception, match=r"element \(1,\): yours nan, reference 2"):
        compare(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0]), Tolerance(1e-3))
    assert compare(torch.tensor([1.0, 2.0005]), torch.tensor([1.0, 2.0]), Tolerance(1e-3)) == pytest.approx(5e-4, 1e-3)


def test_check_refuses_unknown_names_and_candidates_for_the_checklist():
    with pytest.raises(MinidiffError, match="unknown milestone 'ddim'.*ddim_step"):
        check("ddim")
    with pytest.raises(MinidiffError, match="takes no function of yours"):
        check("compile", lambda: None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")
def test_gpu_milestones_are_skipped_on_a_cpu_with_the_reason():
    result = check("realtime")
    assert result.status == "skip" and "needs a GPU" in result.detail and result


# --- course sampler milestones with a student's sampler ---------------------------------------------------


def student_ddim(model, x, alphas_cumprod, steps):
    """A student's DDIM loop built on ddim_step, on SD's grid (leading, steps_offset 1), taking no spacing."""
    timesteps = list(range(1, 1000, 1000 // steps))[::-1]
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else 0
        x = ddim_step(x, model(x, t), alphas_cumprod[t], alphas_cumprod[t_prev])
    return x


def test_course_samplers_take_a_students_sampler():
    assert check("ddim_50", student_ddim).status == "pass"
    # DDIM is not DPM++: the trajectory differs from the second step on
    message = failure("dpmpp_20", student_ddim)
    assert message.startswith("leading grid with steps_offset=1 (SD's; your sampler takes no spacing), step 2 (t=")
    message = failure("ddim_50", lambda model, x, alphas_cumprod, steps: student_ddim(model, x, alphas_cumprod, 10))
    assert "step 0: your model was asked about t=901, the reference about t=981" in message
    assert "10 timesteps for 50 steps" in message


def test_dpmpp_20_on_a_shapes_folder(tiny_sd, monkeypatch):
    """With weights/shapes present the shapes model is compared too (here a random tiny model in its place)."""
    from minidiff.course.milestones import checklist as milestones_course

    monkeypatch.setattr(milestones_course, "SHAPES_WEIGHTS", tiny_sd[0])
    result = check("dpmpp_20")
    assert "shapes model" in result.detail, str(result)


# --- the command line and loading a student's file -------------------------------------------------------


@pytest.fixture
def student_file(tmp_path):
    path = tmp_path / "my_code.py"
    path.write_text(textwrap.dedent("""
        import math
        from helper import half  # a module beside the file can be imported

        def my_ddim_step(x_t, eps, alpha_bar_t, alpha_bar_prev, eta=0.0, noise=None):
            pred_x0 = (x_t - math.sqrt(1 - alpha_bar_t) * eps) / math.sqrt(alpha_bar_t)
            sigma = eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev))
            x_prev = math.sqrt(alpha_bar_prev) * pred_x0 + math.sqrt(1 - alpha_bar_prev - sigma**2) * eps
            return x_prev + sigma * noise if eta > 0 else x_prev

        def deterministic_only(x_t, eps, alpha_bar_t, alpha_bar_prev, eta=0.0, noise=None):
            return my_ddim_step(x_t, eps, alpha_bar_t, alpha_bar_prev)

        def my_attention(q, k, v):
            return (q @ k.transpose(-2, -1) * half(q.shape[-1])).softmax(dim=-2) @ v
    """))
    (tmp_path / "helper.py").write_text("def half(d):\n    return d ** -0.5\n")
    return path


def test_cli_checks_a_students_functions(student_file, capsys):
    assert cli_main(["milestones", "--ddim-step", f"{student_file}:my_ddim_step"]) == 0
    out = capsys.readouterr().out
    assert "✓ ddim_step" in out and "1 passed, 0 failed, 0 skipped" in out and "attention" not in out

    status = cli_main(["milestones", "--ddim-step", f"{student_file}:my_ddim_step", "--attention",
                       f"{student_file}:my_attention"])
    assert status == 1
    out = capsys.readouterr().out
    assert "✓ ddim_step" in out and "✗ attention" in out and "softmax over the wrong axis" in out


def test_check_from_python_with_a_path(student_file):
    assert check("ddim_step", f"{student_file}:my_ddim_step")
    ignored = str(check("ddim_step", f"{student_file}:deterministic_only"))
    assert ignored.startswith("✗ ddim_step: eta=1, t=981 -> 961, element (0, 0, 0, 0)") and "eta is ignored" in ignored
    assert "✗ attention: self-attention, element" in str(check("attention", f"{student_file}:my_attention"))


@pytest.mark.parametrize("spec, expected", [
    ("no_colon.py", "FILE.py:FUNCTION"),
    ("missing.py:f", "cannot find missing.py"),
    ("lesson.ipynb:f", "jupyter nbconvert --to script"),
])
def test_cli_errors_for_a_bad_candidate(spec, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lesson.ipynb").write_text("{}")
    assert cli_main(["milestones", "--ddim-step", spec]) == 2
    assert expected in capsys.readouterr().err


def test_load_candidate_names_what_the_file_defines(student_file, tmp_path):
    with pytest.raises(MinidiffError, match="no function 'ddim'; it defines: deterministic_only, my_attention, my_"):
        load_candidate(f"{student_file}:ddim")
    broken = tmp_path / "broken.py"
    broken.write_text("x = 1\ny = undefined_name\n")
    with pytest.raises(MinidiffError, match="running .*broken.py failed at line 2: NameError"):
        load_candidate(f"{broken}:f")


def test_cli_list_and_unknown_names(capsys):
    assert cli_main(["milestones", "--list"]) == 0
    out = capsys.readouterr().out
    assert "ddim_step(x_t, eps, alpha_bar_t, alpha_bar_prev, eta=0.0, noise=None)" in out and "realtime" in out
    assert cli_main(["milestones", "--only", "ddim"]) == 2
    assert "unknown milestone 'ddim'" in capsys.readouterr().err


def test_run_reports_each_line_and_a_summary():
    lines = []
    results = run(["ddim_50", "add_noise"], report=lines.append)
    assert [r.name for r in results] == ["ddim_50", "add_noise"] and all(results)
    assert lines[0] == "Course checklist" and lines[1].startswith("  ✓ ddim_50 ") and lines[2] == "Modules"
    assert lines[3].startswith("  ✓ add_noise ") and lines[4].startswith("2 passed, 0 failed, 0 skipped")


@pytest.mark.slow
def test_the_whole_checklist_passes_on_minidiff(capsys):
    """`minidiff milestones`, everything (torch.compile included): exit status 0 on a CPU."""
    assert cli_main(["milestones", "--reference"]) == 0
    out = capsys.readouterr().out
    assert "0 failed" in out and "✓ compile" in out and "✓ half_precision" in out
