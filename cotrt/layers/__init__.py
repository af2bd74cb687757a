"""The modules that use cotrt's ops inside a wrapped model, one file per op:
``rms_norm`` (FusedRMSNorm), ``rope`` (RopePatch), ``valve_lora`` (ValveLinear),
``cpu_linear`` (CpuLinear)."""
