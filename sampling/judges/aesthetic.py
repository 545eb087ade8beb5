"""Two prompt-free aesthetic judges for `srpo.py evaluate`: a frozen transformers vision tower gives an image
embedding e, L2-normalised, and a scoring head maps it to the score, s = head(e / |e|).

- `aesthetic`: Aesthetic Predictor v2.5 (discus0434/aesthetic-predictor-v2-5; the "Aesthetic" column of SRPO's
  Table 1): e is SigLIP so400m-patch14-384's pooled output (its attention-pooling head's).
- `laion-aesthetic`: the LAION improved aesthetic predictor (christophschuhmann/improved-aesthetic-predictor,
  sac+logos+ava1-l14-linearMSE.pth): e is OpenAI CLIP ViT-L/14's projected image embedding.

Each judge's path is one folder: the tower in transformers format, as its hub repository ships it (the whole
SiglipModel / CLIPModel, or only its vision model saved with save_pretrained), with the predictor's head file put in
it. Both heads are the same five nn.Linear layers without an activation (ScoreHead). Images are preprocessed in torch
as each predictor's reference preprocesses the image saved as 8-bit RGB (resize_8bit): a judge scores a tensor as its
reference scores the PNG of it. Heads are read by weights/aesthetic_weights.py, the towers by transformers
(common.util.load_pretrained).
"""

import os

import torch
import torch.nn.functional as F

from common.util import InputError, check_folder, first_line, load_pretrained, read_json
from reward import _HF_WEIGHTS
from sampling.judges.parts import ScoreHead, clip_pixels, resize_8bit
from weights.aesthetic_weights import read_head

# transformers is imported in the functions that build its models and configs: importing it takes ~4 s.

class AestheticJudge(torch.nn.Module):
    """A judge s_i = head(e_i / |e_i|), e_i the vision tower's embedding of image i preprocessed as the reference
    does; frozen. Subclasses say which tower, embedding, preprocessing and head file."""

    name: str  # the --judges entry and the model flag --NAME
    title: str  # the model's name in messages
    metavar = "DIR"
    path_help: str  # --NAME's help: what the folder holds
    model_types: tuple  # config.json's model_type: the whole model's or its vision model's
    head_file: str  # the head's file name in the folder
    head_prefix: str  # its keys' prefix
    linear_at: tuple  # ScoreHead's Linear indices (the published Sequential's)

    def __init__(self, vision, head):
        super().__init__()
        self.vision, self.head = vision, head
        self.eval().requires_grad_(False)

    @classmethod
    def check_path(cls, path):
        """One-line InputError unless path is a folder with config.json (model_type one of model_types), weights
        and head_file; nothing is loaded."""
        path = str(path)
        check_folder(path, cls.path_help)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise InputError(f"{path}: no config.json (expected {cls.path_help})")
        model_type = read_json(os.path.join(path, "config.json")).get("model_type")
        if model_type not in cls.model_types:
            raise InputError(f"{os.path.join(path, 'config.json')}: model_type {model_type!r}, expected "
                             f"{' or '.join(map(repr, cls.model_types))} (expected {cls.path_help})")
        if not any(os.path.isfile(os.path.join(path, file)) for file in _HF_WEIGHTS):
            raise InputError(f"{path}: no weights (expected one of {', '.join(_HF_WEIGHTS)})")
        if not os.path.isfile(os.path.join(path, cls.head_file)):
            raise InputError(f"{path}: no {cls.head_file} (expected {cls.path_help})")

    @classmethod
    def load(cls, path, tokenizer=None, device="cpu", dtype=torch.float32):
        """The judge of a folder (check_path's); tokenizer is ignored: these judges read no text. The head is read
        and checked against the tower's config before the tower loads."""
        cls.check_path(path)
        try:
            config = cls.vision_config(str(path))
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise InputError(f"{path}: cannot read config.json as a {cls.title} tower's ({first_line(e)})") from None
        with torch.device("meta"):
            head = ScoreHead(cls.embed_width(config), cls.linear_at)
        expected = {cls.head_prefix + key: tuple(t.shape) for key, t in head.state_dict().items()}
        tensors = read_head(os.path.join(str(path), cls.head_file), expected, f"{cls.title}'s head, {cls.head_file}")
        head.load_state_dict({key.removeprefix(cls.head_prefix): t for key, t in tensors.items()}, assign=True)
        vision = load_pretrained(cls.vision_class(), path, f"{cls.title} vision tower", config=config, dtype=dtype)
        return cls(vision, head).to(device=device, dtype=dtype)

    @classmethod
    def tiny(cls, seed=0, device="cpu", dtype=torch.float32):
        """A random judge of the same architecture at tiny_config's sizes (the head keeps its widths), built in
        code: for the offline demo and tests; the same for the same seed."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            config = cls.tiny_config()
            vision = cls.vision_class()(config)
            head = ScoreHead(cls.embed_width(config), cls.linear_at)
        return cls(vision, head).to(device=device, dtype=dtype)

    @property
    def device(self):
        return self.head[0].weight.device

    @property
    def dtype(self):
        return self.head[0].weight.dtype

    @property
    def image_size(self):
        return self.vision.config.image_size

    def score(self, images, prompts):
        """s_i = head(e_i / |e_i|), e = embed(pixels(images)); images (B, 3, H, W) in [0, 1], any size; prompts
        ignored. -> (B,) float32."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"images must be (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        pixels = self.pixels(images.to(self.device).float())
        embeds = F.normalize(self.embed(pixels.to(self.dtype)).float(), dim=-1)
        return self.head(embeds.to(self.dtype))[:, 0].float()


class AestheticV25(AestheticJudge):
    """Aesthetic Predictor v2.5: e = SigLIP's pooled output (SiglipVisionModel.pooler_output), head keys
    scoring_head.{0,2,4,6,8} (Dropouts at 1, 3, 5, 7). Its reference preprocessing (SiglipImageProcessor of
    google/siglip-so400m-patch14-384, on a PIL image): resize to image_size x image_size (config.json's, 384 as
    its preprocessor_config.json's; no crop: the aspect ratio is not kept), bicubic, then x / 255 normalised with
    mean = std = 0.5, i.e. 2 x - 1."""

    name, title = "aesthetic", "Aesthetic Predictor v2.5"
    path_help = ("google/siglip-so400m-patch14-384 in transformers format (config.json + weights) with "
                 "aesthetic_predictor_v2_5.pth, the v2.5 head, put in it")
    model_types = ("siglip", "siglip_vision_model")
    head_file, head_prefix, linear_at = "aesthetic_predictor_v2_5.pth", "scoring_head.", (0, 2, 4, 6, 8)

    @staticmethod
    def vision_class():
        from transformers import SiglipVisionModel

        return SiglipVisionModel

    @staticmethod
    def vision_config(path):
        """The vision config of a SiglipModel folder (its vision_config) or of a SiglipVisionModel folder."""
        from transformers import SiglipVisionConfig

        return SiglipVisionConfig.from_pretrained(path, local_files_only=True)

    @staticmethod
    def embed_width(config):
        return config.hidden_size

    @staticmethod
    def tiny_config():
        """so400m's architecture (GELU-tanh, LayerNorm eps 1e-6, attention-pooling head), 32 wide, 2 layers."""
        from transformers import SiglipVisionConfig

        return SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=56, patch_size=14)

    def pixels(self, images):
        return resize_8bit(images, self.image_size, self.image_size) * 2 - 1

    def embed(self, pixels):
        return self.vision(pixel_values=pixels).pooler_output


class LaionAesthetic(AestheticJudge):
    """The LAION improved aesthetic predictor: e = CLIP ViT-L/14's image embedding, P . post_ln(ViT(x)[CLS])
    (CLIPVisionModelWithProjection.image_embeds, OpenAI's encode_image), head keys layers.{0,2,4,6,7} (Dropouts at
    1, 3, 5). Its reference preprocessing (OpenAI CLIP's, on a PIL image): short side to image_size (the long one to
    floor(image_size long / short)), bicubic, centre crop, CLIP mean/std."""

    name, title = "laion-aesthetic", "LAION aesthetic predictor"
    path_help = ("openai/clip-vit-large-patch14 in transformers format (config.json + weights) with "
                 "sac+logos+ava1-l14-linearMSE.pth, the predictor's MLP, put in it")
    model_types = ("clip", "clip_vision_model")
    head_file, head_prefix, linear_at = "sac+logos+ava1-l14-linearMSE.pth", "layers.", (0, 2, 4, 6, 7)

    @staticmethod
    def vision_class():
        from transformers import CLIPVisionModelWithProjection

        return CLIPVisionModelWithProjection

    @staticmethod
    def vision_config(path):
        """A CLIPVisionModelWithProjection folder's config, or a CLIPModel folder's vision_config with the model's
        projection_dim (a vision_config saved inside a CLIPConfig may hold the default 512 instead)."""
        from transformers import CLIPConfig, CLIPVisionConfig

        if read_json(os.path.join(path, "config.json")).get("model_type") != "clip":
            return CLIPVisionConfig.from_pretrained(path, local_files_only=True)
        config = CLIPConfig.from_pretrained(path, local_files_only=True)
        config.vision_config.projection_dim = config.projection_dim
        return config.vision_config

    @staticmethod
    def embed_width(config):
        return config.projection_dim

    @staticmethod
    def tiny_config():
        """ViT-L/14's architecture (QuickGELU, LayerNorm eps 1e-5, 64-wide heads), 128 wide, 2 layers."""
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                                image_size=56, patch_size=14, projection_dim=32)

    def pixels(self, images):
        return clip_pixels(images, self.image_size)

    def embed(self, pixels):
        return self.vision(pixel_values=pixels).image_embeds
