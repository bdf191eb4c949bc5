"""The one gate every loader passes: the trust policy first, then decryption, then the adapter.

``api.load``, batch jobs, ``modelpod predict``, the server (its startup loads and the repository
load API) all load through ``load_model``; ``import`` and ``pull`` call ``TrustPolicy.check`` before
anything reaches the store.
"""

from __future__ import annotations

from modelpod.frameworks import require
from modelpod.model import Model
from modelpod.pod import Pod
from modelpod.settings import Settings
from modelpod.trust.encryption import decrypted, is_encrypted, read_key
from modelpod.trust.policy import TrustPolicy


def decrypt_key(settings: Settings) -> bytes | None:
    """The key of ``--decrypt-key`` / ``MODELPOD_DECRYPT_KEY_FILE`` (None when neither is set)."""
    return read_key(settings.decrypt_key_file) if settings.decrypt_key_file is not None else None


def admit(pod: Pod, policy: TrustPolicy, what: str | None = None) -> object:
    """Raise the policy's refusal for ``pod``; the trusted Signer (or None when none is required)."""
    return policy.check_dir(what or f"pod {pod.name}", pod.digest, pod.path)


def load_model(pod: Pod, settings: Settings, *, policy: TrustPolicy | None = None, what: str | None = None) -> Model:
    """The pod's Model once the policy admits it; an encrypted pod is decrypted in memory and
    loaded at once (its plaintext is gone when this returns), any other is returned unloaded."""
    admit(pod, policy if policy is not None else TrustPolicy.from_settings(settings), what)
    adapter = require(pod.manifest.framework)
    if not is_encrypted(pod.manifest):
        model: Model = adapter.load(pod)
        return model
    key = decrypt_key(settings)
    with decrypted(pod, key) as plain:
        model = adapter.load(plain)
        model.load()
    return model
