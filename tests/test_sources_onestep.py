"""``OneStepPipeline`` with Diffusers conventions (issue 14 item 4): pil default, num_images_per_prompt,
generator, prompts for text students, save_pretrained/from_pretrained, unknown keywords refused by name."""

from __future__ import annotations

import pytest
import torch

from fastgen.distill import OneStepPipeline
from fastgen.models import load_model


@pytest.fixture(scope="module")
def pipe():
    return OneStepPipeline.from_pretrained("digits-fdistill-js")


def test_defaults_and_batch_rules(pipe):
    imgs = pipe(3, class_labels=[1, 2, 3], num_images_per_prompt=2, generator=torch.Generator().manual_seed(0)).images
    assert len(imgs) == 6 and imgs[0].size == (8, 8) and imgs[0].mode == "L"  # "pil" is the default
    x = pipe(class_labels=[1, 2, 3], num_images_per_prompt=2, generator=torch.Generator().manual_seed(0),
             output_type="pt").images
    z = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = load_model("digits-fdistill-js").generator(z, torch.tensor([1, 1, 2, 2, 3, 3]))
    torch.testing.assert_close(x, ref, atol=0, rtol=0)
    arr = pipe(2, class_labels=4, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert arr.shape == (2, 8, 8, 1) and 0 <= arr.min() and arr.max() <= 1
    (t,) = pipe(1, class_labels=0, output_type="pt", return_dict=False)
    assert t.shape == (1, 1, 8, 8)


def test_unknown_and_inapplicable_keywords_are_refused_by_name(pipe):
    with pytest.raises(ValueError, match=r"does not take \['guidance_scale', 'num_inference_steps'\]"):
        pipe(1, num_inference_steps=4, guidance_scale=7.5)
    with pytest.raises(ValueError, match="prompt does not apply"):
        pipe(prompt="a seven")
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 10\)"):
        pipe(2, class_labels=[3, 12])
    with pytest.raises(ValueError, match="output_type must be one of"):
        pipe(1, output_type="latent")
    with pytest.raises(ValueError, match="not a one-step student"):
        OneStepPipeline.from_pretrained("digits-edm")


def test_save_pretrained_round_trip(pipe, tmp_path):
    path = pipe.save_pretrained(tmp_path / "student-dir")
    assert path.name == "student.safetensors" and (tmp_path / "student-dir" / "student.json").is_file()
    again = OneStepPipeline.from_pretrained(tmp_path / "student-dir")
    kw = dict(class_labels=[5, 6], output_type="pt")
    a = pipe(**kw, generator=torch.Generator().manual_seed(3)).images
    b = again(**kw, generator=torch.Generator().manual_seed(3)).images
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_text_student_takes_prompts(tmp_path):
    from _tiny_pipelines import save_sd_pipeline

    from fastgen.models.onestep import OneStepStudent

    m = load_model(save_sd_pipeline(tmp_path / "sd"))
    student = OneStepStudent(m.denoiser, sigma=m.sigma_max)
    p = OneStepPipeline(student, m.shape, encode_prompt=m.encode_prompt, decoder=m.decoder)
    x = p(prompt=["a cat", "a dog"], num_images_per_prompt=2, generator=torch.Generator().manual_seed(0),
          output_type="pt").images
    z = torch.randn(4, *m.shape, generator=torch.Generator().manual_seed(0))
    cond = m.condition(4, prompts=["a cat", "a cat", "a dog", "a dog"])[0]
    with torch.no_grad():
        ref = m.decode(student(z, cond))
    assert x.shape == (4, 1, 8, 8)
    torch.testing.assert_close(x, ref, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="pass prompt"):
        p(2)
    with pytest.raises(ValueError, match="negative_prompt does not apply"):
        p(prompt="a cat", negative_prompt="blur")
