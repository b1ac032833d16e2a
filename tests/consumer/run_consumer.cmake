# cmake -P script behind the consumer.find_package test (see CMakeLists.txt):
# installs vattn from VATTN_BUILD_DIR into WORK_DIR/prefix, then configures,
# builds and runs the consumer project in WORK_DIR/build against it.
cmake_minimum_required(VERSION 3.25)

foreach(var VATTN_BUILD_DIR CONSUMER_SOURCE_DIR WORK_DIR GENERATOR CXX_COMPILER)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "run_consumer.cmake: -D${var}=... is required")
  endif()
endforeach()
if("${CONFIG}" STREQUAL "")
  set(CONFIG Release)
endif()

set(prefix ${WORK_DIR}/prefix)
set(build ${WORK_DIR}/build)
file(REMOVE_RECURSE ${prefix} ${build})

function(run_step what)
  message(STATUS "consumer: ${what}: ${ARGN}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "consumer: ${what} failed (${rc})")
  endif()
endfunction()

run_step(install
  ${CMAKE_COMMAND} --install ${VATTN_BUILD_DIR} --prefix ${prefix} --config ${CONFIG})

set(make_program_arg)
if(NOT "${MAKE_PROGRAM}" STREQUAL "")
  set(make_program_arg -DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM})
endif()
# Only the install prefix is searched for vattn: its own dependencies (Abseil)
# come from the system, as they would for a user.
run_step(configure
  ${CMAKE_COMMAND} -S ${CONSUMER_SOURCE_DIR} -B ${build} -G ${GENERATOR}
    ${make_program_arg}
    -DCMAKE_CXX_COMPILER=${CXX_COMPILER}
    -DCMAKE_BUILD_TYPE=${CONFIG}
    -DCMAKE_PREFIX_PATH=${prefix}
    -DVATTN_EXPECTED_PREFIX=${prefix}
    -DCMAKE_FIND_PACKAGE_NO_PACKAGE_REGISTRY=ON)
run_step(build ${CMAKE_COMMAND} --build ${build} --config ${CONFIG})

find_program(consumer NAMES vattn_consumer
  PATHS ${build} ${build}/${CONFIG} NO_DEFAULT_PATH REQUIRED)
run_step(run ${consumer})
