# Sourced by the GPU scripts: the carried wheels (datasets, dill, multiprocess, mase-triton,
# colorlog: not in the device image; device tool carry=[".whl"]) installed into /tmp/site and
# put on PYTHONPATH before the repository, unbuffered output, no compilation cache (so compile
# times are measured), and the JAX version and devices printed.
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 JAXFLIP_COMPILATION_CACHE=""
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
