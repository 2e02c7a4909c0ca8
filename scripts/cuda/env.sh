# Sourced by scripts/cuda/build.sh and scripts/gpu_check.sh: installs the CUDA compiler wheels
# (scripts/cuda/requirements.txt) into .venv-cuda when they changed, and exports PATH,
# CUDA_PATH/CUDA_ROOT/CUDA_HOME for candle's and cudarc's build scripts. Run from the
# repository root.
if [ ! -x .venv-cuda/bin/python ] || ! cmp -s scripts/cuda/requirements.txt .venv-cuda/requirements.stamp; then
  [ -x .venv-cuda/bin/python ] || python3 -m venv .venv-cuda
  .venv-cuda/bin/pip install -q --disable-pip-version-check -r scripts/cuda/requirements.txt
  cp scripts/cuda/requirements.txt .venv-cuda/requirements.stamp
fi
cuda=$(.venv-cuda/bin/python -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')
export PATH=$cuda/bin:$PATH CUDA_PATH=$cuda CUDA_ROOT=$cuda CUDA_HOME=$cuda
