# ctest `fuzz.<target>.run`: replays the seed corpus, then fuzzes for
# SECONDS into a scratch corpus (WORK_DIR/corpus, seeded from CORPUS, so
# the repository's corpus is never written). Any crash, leak, sanitizer
# report or model mismatch fails the test; libFuzzer writes the input to
# WORK_DIR/crash-* (or leak-*, timeout-*) and the log names it.
#   cmake -DFUZZER=... -DCORPUS=... -DWORK_DIR=... -DSECONDS=60 -P run_fuzzer.cmake
foreach(var FUZZER CORPUS WORK_DIR SECONDS)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "run_fuzzer.cmake: ${var} is not set")
  endif()
endforeach()
file(REMOVE_RECURSE "${WORK_DIR}/corpus")
file(MAKE_DIRECTORY "${WORK_DIR}/corpus")
file(GLOB _seeds "${CORPUS}/*")
list(LENGTH _seeds _n)
if(_n EQUAL 0)
  message(FATAL_ERROR "run_fuzzer.cmake: no seed inputs in ${CORPUS}")
endif()
file(COPY ${_seeds} DESTINATION "${WORK_DIR}/corpus")

set(_common -timeout=20 -rss_limit_mb=4096 -max_len=2048
            -artifact_prefix=${WORK_DIR}/ -print_final_stats=1)
message(STATUS "replaying ${_n} seed inputs from ${CORPUS}")
execute_process(COMMAND "${FUZZER}" ${_common} -runs=0 "${CORPUS}"
                RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "replaying the seed corpus failed (rc=${rc}); see above")
endif()
if(SECONDS GREATER 0)
  message(STATUS "fuzzing for ${SECONDS} s (scratch corpus ${WORK_DIR}/corpus)")
  execute_process(COMMAND "${FUZZER}" ${_common} -max_total_time=${SECONDS}
                          "${WORK_DIR}/corpus"
                  RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "fuzzing found a failure (rc=${rc}): the input is in "
                        "${WORK_DIR}/ (crash-*, leak-*, timeout-*); reproduce "
                        "with ${FUZZER} <file>")
  endif()
endif()
