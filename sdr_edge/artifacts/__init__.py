"""Artifacts: atomic writes, safetensors weights, Ed25519 signing, bundles, run directories,
exported-model metadata."""
