# Warning flags, private to each target that asks for them.
function(vattn_set_warnings target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic -Wshadow
      -Wnon-virtual-dtor -Wold-style-cast -Wcast-align -Woverloaded-virtual
      -Wnull-dereference -Wformat=2>
    $<$<AND:$<COMPILE_LANGUAGE:CXX>,$<CXX_COMPILER_ID:Clang>>:-Wthread-safety>
    $<$<AND:$<COMPILE_LANGUAGE:CXX>,$<BOOL:${VATTN_WERROR}>>:-Werror>)
endfunction()
