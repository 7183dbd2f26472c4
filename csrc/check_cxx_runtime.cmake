# Run after linking megarl._C (see CMakeLists.txt): refuses an extension that carries its own
# static copy of the C++ runtime. torch loads the shared libstdc++; a second copy inside _C crashes
# the process the first time the extension formats an error message (seen on a machine whose
# default g++ links libstdc++ statically: every TORCH_CHECK failure was a segfault).
# Inputs: -DOBJDUMP=<objdump> -DLIBRARY=<path of _C> -DCOMPILER=<the C++ compiler>.
execute_process(COMMAND "${OBJDUMP}" -p "${LIBRARY}" OUTPUT_VARIABLE headers RESULT_VARIABLE status)
if(NOT status EQUAL 0)
  message(WARNING "megarl: `${OBJDUMP} -p` could not read ${LIBRARY}; its C++ runtime is not checked")
elseif(NOT headers MATCHES "NEEDED[ \t]+lib(stdc|c)\\+\\+")
  message(FATAL_ERROR
    "megarl: ${COMPILER} linked a static copy of the C++ runtime into megarl._C (it needs no shared "
    "libstdc++), beside the shared one torch loads: the first error raised in the extension would crash "
    "the process. Build with a compiler that links libstdc++ shared, e.g. "
    "CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++ pip install --no-build-isolation -e .")
endif()
