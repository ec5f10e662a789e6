"""Lesson 08, text and guidance: SD 1.x's 77 token ids, and classifier-free guidance (Ho & Salimans 2022).

Notation (course/08_text_and_guidance.md):
    ids              -> <|startoftext|> 49406, at most 75 BPE tokens, <|endoftext|> 49407, then 49407 padding to 77
    eps_uncond/cond  -> eps_theta(x_t, t, empty prompt) and eps_theta(x_t, t, prompt)
    w                -> guidance_scale; phi -> guidance_rescale (Lin et al. 2023, eq. 16)
"""

from minidiff.tokenizer import CLIPTokenizer


def tokenize(text):
    """SD 1.x's 77 ids of one prompt: [49406, *tokens[:75], 49407] padded with 49407 to 77 (a list of ints).

    The BPE itself is the library's: CLIPTokenizer.sd15().encode(text) gives the tokens.
    """
    ids = [49406, *CLIPTokenizer.sd15().encode(text)[:75], 49407]
    return ids + [49407] * (77 - len(ids))


def guided_eps(eps_uncond, eps_cond, guidance_scale, guidance_rescale=0.0):
    """Classifier-free guidance: eps = eps_uncond + w (eps_cond - eps_uncond).

    With phi = guidance_rescale > 0 (Lin et al. 2023, eq. 15-16), per picture (std over every axis but the batch):
    rescaled = eps * std(eps_cond) / std(eps), and eps = phi rescaled + (1 - phi) eps.
    """
    guided = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
    if guidance_rescale > 0:
        dims = list(range(1, guided.ndim))
        rescaled = guided * eps_cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
        guided = guidance_rescale * rescaled + (1 - guidance_rescale) * guided
    return guided
