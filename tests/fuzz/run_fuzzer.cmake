# ctest `fuzz.<target>.run`: replays the seed corpus, then fuzzes for
# SECONDS into a scratch corpus (WORK_DIR/corpus, seeded from CORPUS, so
# the repository's corpus is never written). Any crash, leak, sanitizer
# report or model mismatch found by the replay fails the test. A failure
# the timed campaign finds is replayed alone (five times): if it
# reproduces it fails the test; if it does not (it depended on the
# background thread's timing or on an earlier input's process state) it is
# reported as a WARNING naming the input, and the test passes - such
# findings are real and are tracked in tests/fuzz/known_failures/, but a
# CI run must not turn red at random. libFuzzer writes the input to
# WORK_DIR/crash-* (or leak-*, timeout-*) and the log names it.
#   cmake -DFUZZER=... -DCORPUS=... -DWORK_DIR=... -DSECONDS=60 -P run_fuzzer.cmake
foreach(var FUZZER CORPUS WORK_DIR SECONDS)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "run_fuzzer.cmake: ${var} is not set")
  endif()
endforeach()
file(REMOVE_RECURSE "${WORK_DIR}/corpus")
file(GLOB _old_artifacts "${WORK_DIR}/crash-*" "${WORK_DIR}/leak-*"
     "${WORK_DIR}/timeout-*" "${WORK_DIR}/oom-*")
if(_old_artifacts)
  file(REMOVE ${_old_artifacts})
endif()
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
    file(GLOB _found "${WORK_DIR}/crash-*" "${WORK_DIR}/leak-*"
         "${WORK_DIR}/timeout-*" "${WORK_DIR}/oom-*")
    if(NOT _found)
      message(FATAL_ERROR "fuzzing failed (rc=${rc}) without writing an input; "
                          "see above")
    endif()
    foreach(_input ${_found})
      execute_process(COMMAND "${FUZZER}" ${_common} -runs=5 "${_input}"
                      RESULT_VARIABLE _again)
      if(NOT _again EQUAL 0)
        message(FATAL_ERROR "fuzzing found a failure that reproduces "
                            "(rc=${_again}): ${_input}; reproduce with "
                            "${FUZZER} ${_input}")
      endif()
      file(READ "${_input}" _hex HEX)
      message(WARNING "fuzzing found a failure (rc=${rc}) that does not "
                      "reproduce when its input is replayed alone: timing- or "
                      "process-state-dependent; see the log above and "
                      "tests/fuzz/known_failures/README.md. Input ${_input} "
                      "(hex ${_hex})")
    endforeach()
  endif()
endif()
