"""What the pack says of each image family of the host (``comfy.supported_models`` class names).

Read by the training nodes before they start: a refused family stops with the reason, an untested
one trains with a warning on the node, a tested one says nothing. The README's family table is this
dict (tests/test_consistency.py holds them together). No host import here, so the table can be read
without ComfyUI. Families not listed (newer hosts) get the untested warning. Video, audio, 3D,
upscaler and estimation models are not image-editing models and are not listed.
"""
from __future__ import annotations

TESTED, OPT_IN, UNTESTED, REFUSED = "tested", "tested (opt-in)", "untested", "refused"

# class name -> (family, verdict, note). "tested": tests/host on a tiny file the host detects as
# that class (detected as its objective, the objective by hand, both stages, LoRA reload, Cancel,
# sampling); "tested (opt-in)": the same, hundreds of millions of parameters at the smallest size
# the host detects, run with IMAGIC_HOST_SLOW=1; "untested": an objective the pack knows, no test.
FAMILIES = {
    "SD15": ("Stable Diffusion 1.x", TESTED, "epsilon"),
    "SD20": ("Stable Diffusion 2.x", TESTED, "epsilon and v-prediction (768-v)"),
    "SDXL": ("SDXL and its fine-tunes (Pony, Illustrious, ...)", TESTED,
             "epsilon (v-prediction files: the objective SD 2.x tests; EDM variants such as Playground 2.5 are "
             "refused by their kind)"),
    "SD3": ("SD3 / SD3.5", TESTED, "flow, shift 3"),
    "Flux": ("Flux.1 dev, Krea-dev, Kontext", TESTED, "flow (ModelSamplingFlux); Kontext reference latents tested"),
    "Flux2": ("Flux.2 dev, Flux.2 Klein 4B/9B", TESTED, "flow; reference latents tested"),
    "Krea2": ("Krea 2", TESTED,
              "flow; reference latents (index, index_timestep_zero) tested; the real 30720-wide text side opt-in"),
    "HunyuanImage21": ("HunyuanImage 2.1", TESTED, "flow, shift 5; on ComfyUI 0.8 its rope kernel has no backward: "
                                                     "refused there with that reason"),
    "QwenImage": ("Qwen-Image, Qwen-Image-Edit", OPT_IN, "flow; 380M at the smallest detectable size"),
    "Lumina2": ("Lumina Image 2.0", OPT_IN, "flow, shift 6; 427M"),
    "ZImage": ("Z-Image (Turbo, Base)", OPT_IN, "flow, shift 3; 909M"),
    "Chroma": ("Chroma", OPT_IN, "flow; 518M (fixed 5 x 5120 approximator)"),
    "ChromaRadiance": ("Chroma Radiance (pixel space)", OPT_IN, "flow on pixels, no VAE; 1.1B"),
    "FluxSchnell": ("Flux.1 schnell (and guidance-less Flux files)", UNTESTED, "flow, shift 1"),
    "FluxInpaint": ("Flux.1 Fill", UNTESTED, "flow; image and mask as concat conditioning"),
    "LongCatImage": ("LongCat-Image", UNTESTED, "flow (the Flux network)"),
    "HunyuanImage21Refiner": ("HunyuanImage 2.1 refiner", UNTESTED, "flow; the image as concat conditioning"),
    "Lens": ("Lens", UNTESTED, "flow (ModelSamplingFlux)"),
    "MageFlow": ("Mage-Flow", UNTESTED, "flow, shift 6"),
    "JoyImage": ("JoyImage", UNTESTED, "flow; reference latents"),
    "Ideogram4": ("Ideogram 4", UNTESTED, "flow; 53248-wide text projection fixed (>= 250M)"),
    "Boogu": ("Boogu-Image", UNTESTED, "flow; needs the attention mask in the conditioning (num_tokens)"),
    "Omnigen2": ("OmniGen2", UNTESTED, "flow; every size fixed by detection (about 4B)"),
    "HiDream": ("HiDream-I1 / E1", UNTESTED, "flow (shift 1 in 0.33); every size fixed (about 17B)"),
    "PixelDiTT2I": ("PixelDiT (pixel space)", UNTESTED, "flow on pixels; every size fixed by detection"),
    "ZImagePixelSpace": ("Z-Image pixel space", UNTESTED, "flow on pixels; >= 0.73B"),
    "ErnieImage": ("ERNIE-Image", UNTESTED, "flow; every size fixed (about 8B)"),
    "Kandinsky5Image": ("Kandinsky 5 Image", UNTESTED, "flow, shift 3"),
    "AuraFlow": ("AuraFlow", UNTESTED, "flow"),
    "Anima": ("Anima", UNTESTED, "flow; part of its text arrives as T5 token ids (kept fixed; only the float "
                                 "embedding is optimized)"),
    "PixArtAlpha": ("PixArt-alpha", UNTESTED, "epsilon"),
    "PixArtSigma": ("PixArt-sigma", UNTESTED, "epsilon"),
    "HunyuanDiT": ("HunyuanDiT 1.1/1.2", UNTESTED, "v-prediction"),
    "HunyuanDiT1": ("HunyuanDiT 1.0", UNTESTED, "v-prediction"),
    "SDXLRefiner": ("SDXL refiner", UNTESTED, "epsilon"),
    "SSD1B": ("SSD-1B", UNTESTED, "the SDXL network, fewer blocks"),
    "Segmind_Vega": ("Segmind Vega", UNTESTED, "the SDXL network, fewer blocks"),
    "KOALA_700M": ("KOALA 700M", UNTESTED, "the SDXL network, fewer blocks"),
    "KOALA_1B": ("KOALA 1B", UNTESTED, "the SDXL network, fewer blocks"),
    "SD21UnclipL": ("SD 2.1 unCLIP-L", UNTESTED, "image embedding as y"),
    "SD21UnclipH": ("SD 2.1 unCLIP-H", UNTESTED, "image embedding as y"),
    "SD15_instructpix2pix": ("InstructPix2Pix (SD 1.x)", UNTESTED, "the photo as concat conditioning"),
    "SDXL_instructpix2pix": ("InstructPix2Pix (SDXL), CosXL edit", UNTESTED, "the photo as concat conditioning"),
    "Stable_Cascade_C": ("Stable Cascade stage C", UNTESTED, "epsilon on its own schedule"),
    "Stable_Cascade_B": ("Stable Cascade stage B", REFUSED,
                         "the decoder stage: it reads only a pooled text vector and the stage C latent, no text "
                         "embedding to optimize; train stage C"),
    "HiDreamO1": ("HiDream-O1", REFUSED,
                  "the text reaches the model as token ids inside its own language model: there is no text "
                  "embedding for stage 1 to optimize"),
    "CosmosT2IPredict2": ("Cosmos-Predict2 text-to-image", REFUSED,
                          "its prediction kind (COSMOS_RFLOW, a rescaled flow) is not one Imagic trains"),
}


def verdict(class_name: str):
    """(family name, verdict, note) for a supported_models class name; unknown names are untested."""
    return FAMILIES.get(class_name, (class_name, UNTESTED, "a family this version of the pack does not know"))
