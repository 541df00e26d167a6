"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): soft prompts produced by a prompt encoder.

Prompt tuning trains the n prompt vectors directly. P-tuning trains them through a small network,
the prompt encoder, which reads n free input embeddings e_1..e_n and writes the prompt:

    h_1..h_n = MLP(e_1..e_n)                       (peft's "MLP": Linear-ReLU-Linear-ReLU-Linear)
    h_1..h_n = MLP(BiLSTM(e_1..e_n))               (the paper's LSTM encoder, section 3.2)

Liu et al. argue that the prompt vectors should depend on each other (the LSTM mixes them) and
that reparameterizing makes optimization easier than training the vectors directly. After
training the encoder is no longer needed: the n output vectors are the prompt, and a deployment
stores only those (n, d) numbers. Here the encoder's output goes in front of the input embeddings
exactly as in prompt tuning (course.prompt_tuning.SoftPromptModel).

P-tuning v2 (Liu et al. 2022) is a different method with a confusing name: it puts trainable
prompts into the keys and values of *every* layer, which is prefix tuning (Li & Liang 2021)
without the reparameterization, applied to understanding tasks; see course.prefix_tuning.

The parameter names follow peft's PromptEncoder (`embedding`, `mlp_head`, `lstm_head`), so a
state dict moves between the two. As peft's, the encoder stays fp32 on the model's device and
its output is cast to the model's dtype where it joins the input embeddings.
"""

from torch import nn

from course.prompt_tuning import SoftPromptModel

ENCODERS = ("MLP", "LSTM")


class PTuning(SoftPromptModel):
    """A frozen model with a P-tuning prompt encoder; `prompts()` runs the encoder."""

    def __init__(
        self, model, num_virtual_tokens: int, encoder: str = "MLP", encoder_hidden_size: int | None = None
    ):
        self.check_arguments(model, num_virtual_tokens)  # every check before the model is frozen
        if encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
        if encoder_hidden_size is not None and (
            not isinstance(encoder_hidden_size, int)
            or isinstance(encoder_hidden_size, bool)
            or encoder_hidden_size <= 0
        ):
            raise ValueError(
                f"encoder_hidden_size must be a positive integer, or None for peft's default (the model's hidden "
                f"size), got {encoder_hidden_size!r}"
            )
        super().__init__(model, num_virtual_tokens)
        d, device = self.token_dim, self.model_device
        h = encoder_hidden_size or d  # peft's default: the model's hidden size
        self.encoder = encoder
        # (n, d): the encoder's free inputs; fp32 on the model's device, as peft's
        self.embedding = nn.Embedding(num_virtual_tokens, d, device=device)
        if encoder == "LSTM":
            # two layers, no dropout: peft's defaults (encoder_num_layers=2, encoder_dropout=0.0)
            self.lstm_head = nn.LSTM(d, h, num_layers=2, bidirectional=True, batch_first=True, device=device)
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * h, 2 * h, device=device), nn.ReLU(), nn.Linear(2 * h, d, device=device)
            )
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(d, h, device=device),
                nn.ReLU(),
                nn.Linear(h, h, device=device),
                nn.ReLU(),
                nn.Linear(h, d, device=device),
            )

    def prompts(self):
        e = self.embedding.weight  # (n, d)
        if self.encoder == "LSTM":
            mixed = self.lstm_head(e.unsqueeze(0))[0].squeeze(0)  # (1, n, d) -> (n, 2h): each row sees all
            return self.mlp_head(mixed)  # (n, d)
        return self.mlp_head(e)  # (n, d)
